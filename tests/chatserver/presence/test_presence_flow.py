"""Presence frames through a real app: on join, on a member's first and last connection,
coalesced; embedded (memory) and on Redis (one instance here; two: tests/system)."""

from __future__ import annotations

import time

import pytest

from chatclient.client import ChatClient
from chatserver import keys
from protocol import Presence

from ..conftest import Harness, MakeHarness, eventually

INTERVAL_MS = 100


@pytest.fixture(params=["memory", "redis"])
async def app(request: pytest.FixtureRequest, make_harness: MakeHarness) -> Harness:
    overrides: dict[str, object] = {"presence_interval_ms": INTERVAL_MS}
    if request.param == "redis":
        overrides["redis_url"] = request.getfixturevalue("redis_url")
    return await make_harness(**overrides)


async def presence(client: ChatClient, conv: str, online: tuple[str, ...]) -> Presence:
    return await client.expect(
        Presence, lambda p: p.conversation_id == conv and p.online == online, timeout=10
    )


def presences(client: ChatClient, conv: str) -> list[tuple[str, ...]]:
    return [
        f.online for f in client.pending() if isinstance(f, Presence) and f.conversation_id == conv
    ]


async def test_join_gets_the_list_then_first_and_last_connections_change_it(app: Harness) -> None:
    conv = await app.conversation("alice", ["bob"])
    alice = await app.connect("alice")
    await alice.join(conv)
    first = await alice.next_frame()  # right after joined
    assert first == Presence(conv, ("alice",))

    bob = await app.connect("bob")
    await bob.join(conv)
    assert await bob.next_frame() == Presence(conv, ("alice", "bob"))
    await presence(alice, conv, ("alice", "bob"))

    # bob's second tab and its closing change nothing
    bob2 = await app.connect("bob")
    await bob2.join(conv)
    assert await bob2.next_frame() == Presence(conv, ("alice", "bob"))
    await bob2.close()
    # bob's last connection goes: alice is told
    await bob.close()
    await presence(alice, conv, ("alice",))
    await alice.ping("flush")
    assert presences(alice, conv) == []  # one frame per change, nothing for the second tab


async def test_leave_and_a_rejoin_of_a_joined_conversation(app: Harness) -> None:
    conv = await app.conversation("alice", ["bob"])
    alice = await app.connect("alice")
    bob = await app.connect("bob")
    await alice.join(conv)
    await presence(alice, conv, ("alice",))
    await bob.join(conv)
    await presence(alice, conv, ("alice", "bob"))
    await bob.leave(conv)
    await presence(alice, conv, ("alice",))
    await alice.join(conv)  # joined already: a fresh joined, and the list again
    await presence(alice, conv, ("alice",))


async def test_a_reconnect_storm_is_not_a_presence_storm(app: Harness) -> None:
    conv = await app.conversation("alice", ["bob", "carol"])
    alice = await app.connect("alice")
    await alice.join(conv)
    await presence(alice, conv, ("alice",))
    carol = await app.connect("carol")
    await carol.join(conv)
    await presence(alice, conv, ("alice", "carol"))
    started = time.monotonic()
    for _ in range(30):  # bob and carol come and go, over and over
        bob = await app.connect("bob")
        await bob.join(conv)
        await bob.close()
        await carol.close()
        carol = await app.connect("carol")
        await carol.join(conv)
    tracker = app.app[keys.PRESENCE]
    await eventually(tracker.idle, timeout=10)
    elapsed = time.monotonic() - started  # the storm and the flushes after it
    await alice.ping("flush")
    seen = presences(alice, conv)
    # at most one frame a flush (each within one interval), however many changes there were
    assert len(seen) <= 2 + elapsed / (INTERVAL_MS / 1000), (len(seen), elapsed)
    if seen:
        assert seen[-1] == ("alice", "carol")  # and the last is the truth


async def test_a_removed_member_drops_out(app: Harness) -> None:
    conv = await app.conversation("alice", ["bob"])
    alice = await app.connect("alice")
    bob = await app.connect("bob")
    await alice.join(conv)
    await bob.join(conv)
    await presence(alice, conv, ("alice", "bob"))
    bob_api = await app.api("bob")
    status, _ = await bob_api.request("DELETE", f"/api/conversations/{conv}/members/me")
    assert status == 204
    await presence(alice, conv, ("alice",))
