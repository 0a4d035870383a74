"""Presence across real instances on one Redis: a member on one instance sees who is online
on the other, and a member of an instance killed with ``kill -9`` drops out within the TTL."""

from __future__ import annotations

import time
from pathlib import Path

from chatclient.client import ChatClient
from protocol import Presence

from .scaleout import connect, instances
from .test_redis_scaleout import _conversation

TTL_S = 3.0
ENV = {"CHAT_PRESENCE_TTL_S": str(TTL_S), "CHAT_PRESENCE_INTERVAL_MS": "200"}


async def _sees(client: ChatClient, conv: str, online: tuple[str, ...], timeout: float) -> None:
    await client.expect(
        Presence, lambda p: p.conversation_id == conv and p.online == online, timeout=timeout
    )


async def test_presence_crosses_instances_and_a_killed_one_drops_out(
    tmp_path: Path, redis_url: str
) -> None:
    with instances(tmp_path, redis_url, count=3, env=ENV) as (a, b, c):
        conv = await _conversation(a.url, "alice", ["bob", "carol"])
        alice = await connect(a, "alice")
        bob = await connect(b, "bob")
        carol = await connect(c, "carol")
        try:
            await alice.join(conv)
            await _sees(alice, conv, ("alice",), 5)
            await bob.join(conv)
            await _sees(bob, conv, ("alice", "bob"), 5)  # with joined: alice is on A
            await _sees(alice, conv, ("alice", "bob"), 5)

            # bob's last connection closes in order: alice, on another instance, is told
            await bob.close()
            await _sees(alice, conv, ("alice",), 5)

            # carol on C, then C dies without a word: no exit reaches Redis
            await carol.join(conv)
            await _sees(alice, conv, ("alice", "carol"), 5)
            c.kill()
            killed = time.monotonic()
            await _sees(alice, conv, ("alice",), TTL_S + 5)
            # within the TTL (and the coalescing), not at some later cleanup
            assert time.monotonic() - killed <= TTL_S + 2

            # a member joining after that sees the truth
            bob = await connect(b, "bob")
            await bob.join(conv)
            await _sees(bob, conv, ("alice", "bob"), 5)
        finally:
            for client in (alice, bob, carol):
                await client.close()
