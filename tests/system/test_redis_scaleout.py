"""Many instances on one Redis behave as one server (real processes, real redis-server)."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from chatclient.client import ChatApi, Closed, Reply
from protocol import (
    Delta,
    Encoding,
    GenEnd,
    GenStart,
    MessageEvent,
    Reconnect,
    Since,
    TypingNotice,
)
from tests.services import RedisClusterServer, RedisServer

from .scaleout import connect, connect_when_ready, instances, token

LONG = " ".join(f"w{i}" for i in range(80))


@dataclass(frozen=True)
class Backend:
    url: str
    args: tuple[str, ...]
    cluster: bool

    def client(self) -> Redis | RedisCluster:
        return RedisCluster.from_url(self.url) if self.cluster else Redis.from_url(self.url)

    def outbox_keys(self) -> list[str]:
        return [f"chat:outbox:{{{i}}}" for i in range(3)] if self.cluster else ["chat:outbox"]


@pytest.fixture(params=["single", "cluster"])
def backend(request: pytest.FixtureRequest) -> Backend:
    """The same scenarios on one Redis and on a three-master Redis Cluster."""
    if request.param == "single":
        return Backend(request.getfixturevalue("redis_url"), (), False)
    url = request.getfixturevalue("redis_cluster_url")
    return Backend(url, ("--redis-cluster", "yes"), True)


async def _conversation(url: str, owner: str, members: list[str]) -> str:
    async with aiohttp.ClientSession() as http:
        api = ChatApi(url, token(owner), http)
        return str((await api.create_conversation(members=members))["id"])


def _stored_user_messages(path: Path, conv: str) -> list[str]:
    """What the store itself holds (not the window): ids of the user messages."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        rows = db.execute(
            "SELECT id FROM messages WHERE conversation_id = ? AND role = 'user'", (conv,)
        ).fetchall()
    return [row[0] for row in rows]


async def test_members_on_three_instances_see_everything_once_in_order(
    tmp_path: Path, backend: Backend
) -> None:
    with instances(tmp_path, backend.url, args=backend.args) as (a, b, c):
        conv = await _conversation(a.url, "alice", ["bob", "carol"])
        alice = await connect(a, "alice")
        bob = await connect(b, "bob", Encoding.MSGPACK)
        carol = await connect(c, "carol")
        clients = [alice, bob, carol]
        try:
            for client in clients:
                await client.join(conv)
            acks = [await alice.send(conv, "from A"), await bob.send(conv, "from B")]
            for client in clients:
                got = [await client.expect(MessageEvent) for _ in acks]
                assert sorted(m.message.offset for m in got) == [1, 2]
                assert {m.message.id for m in got} == {a.message_id for a in acks}
            for ack in acks:
                replies: list[Reply] = [await cl.reply(ack.message_id) for cl in clients]
                texts = {r.text for r in replies}
                assert len(texts) == 1 and texts.pop().startswith("You said: from")
                for reply in replies:
                    assert [d.seq for d in reply.deltas] == list(range(1, len(reply.deltas) + 1))
                    assert reply.end is not None and reply.end.finish_reason == "stop"
            await carol.ping("flush")
            assert not any(isinstance(f, (MessageEvent, Delta)) for f in carol.pending())
            # typing crosses instances, to the others only
            await alice.typing(conv)
            for client in (bob, carol):
                notice = await client.expect(TypingNotice)
                assert notice.user_id == "alice"
            await alice.ping("flush")
            assert not any(isinstance(f, TypingNotice) for f in alice.pending())
            # carol (instance C) cancels a reply that instance A streams
            ack = await alice.send(conv, LONG)
            start = await carol.expect(GenStart, lambda s: s.reply_to == ack.message_id)
            gen = start.generation_id
            await carol.expect(Delta, lambda d: d.generation_id == gen and d.seq >= 2)
            await carol.cancel(start.generation_id)
            for client in clients:
                end = await client.expect(
                    GenEnd, lambda e: e.generation_id == start.generation_id, timeout=10
                )
                assert end.finish_reason == "cancelled"
                assert end.message is not None and 0 < len(end.message.text) < len(LONG)
        finally:
            for client in clients:
                await client.close()


async def test_a_client_moved_mid_reply_sees_every_character_once(
    tmp_path: Path, backend: Backend
) -> None:
    with instances(tmp_path, backend.url, env={"CHAT_LOCAL_TOKEN_MS": "15"}, args=backend.args) as (
        a,
        b,
        c,
    ):
        conv = await _conversation(a.url, "alice", ["bob"])
        alice = await connect(a, "alice")
        bob = await connect(b, "bob")
        try:
            await alice.join(conv)
            joined = await bob.join(conv)
            ack = await alice.send(conv, LONG)
            start = await bob.expect(GenStart)
            await bob.expect(Delta, lambda d: d.seq == 5)
            await bob.close()
            bob = await connect(c, "bob")  # moved to instance C, mid-reply
            rejoined = await bob.join(conv, Since(ack.offset, joined.epoch))
            assert rejoined.recovered and rejoined.messages == ()
            snapshot = rejoined.generation
            assert snapshot is not None and snapshot.generation_id == start.generation_id
            assert snapshot.seq >= 5
            rest = await bob.follow(start.generation_id)
            assert rest.end is not None and rest.end.message is not None
            seqs = [d.seq for d in rest.deltas]
            assert seqs == list(range(snapshot.seq + 1, snapshot.seq + 1 + len(seqs)))
            assert snapshot.text + rest.text == rest.end.message.text
            assert rest.end.message.text.startswith(f"You said: {LONG}")
            # Offline for N messages: recovers exactly those N on yet another instance.
            last = rest.end.message.offset
            await bob.close()
            for i in range(3):
                sent = await alice.send(conv, f"while away {i}")
                await alice.reply(sent.message_id)
            bob = await connect(a, "bob")
            back = await bob.join(conv, Since(last, joined.epoch))
            assert back.recovered
            assert [m.offset for m in back.messages] == list(range(last + 1, last + 7))
        finally:
            await alice.close()
            await bob.close()


async def test_kill_9_of_the_owner_ends_its_reply_elsewhere(
    tmp_path: Path, backend: Backend
) -> None:
    with instances(tmp_path, backend.url, env={"CHAT_LOCAL_TOKEN_MS": "40"}, args=backend.args) as (
        a,
        b,
        c,
    ):
        conv = await _conversation(b.url, "alice", ["bob"])
        alice = await connect(a, "alice")
        bob = await connect(b, "bob")
        try:
            await alice.join(conv)
            await bob.join(conv)
            ack = await alice.send(conv, LONG)  # instance A owns this reply
            start = await bob.expect(GenStart)
            seen = [await bob.expect(Delta, lambda d, n=n: d.seq == n) for n in (1, 2, 3)]
            a.kill()
            killed_at = time.monotonic()
            gen = start.generation_id
            end = await bob.expect(GenEnd, lambda e: e.generation_id == gen, timeout=15)
            assert time.monotonic() - killed_at < 10
            assert end.finish_reason == "error"
            assert end.message is not None and end.message.finish_reason == "error"
            assert end.message.reply_to == ack.message_id
            assert end.message.text.startswith("".join(d.text for d in seen))
            # alice reconnects elsewhere and finds the ended reply in the history
            alice = await connect(c, "alice")
            joined = await alice.join(conv)
            assert joined.generation is None
            assert joined.messages[-1].id == end.message.id
        finally:
            await alice.close()
            await bob.close()


async def test_a_flushed_window_is_rebuilt_with_a_new_epoch(
    tmp_path: Path, backend: Backend
) -> None:
    with instances(tmp_path, backend.url, count=2, args=backend.args) as (a, b):
        conv = await _conversation(a.url, "alice", [])
        alice = await connect(a, "alice")
        try:
            joined = await alice.join(conv)
            ack = await alice.send(conv, "kept in the store")
            reply = await alice.reply(ack.message_id)
            assert reply.end is not None and reply.end.message is not None
            redis = backend.client()
            try:
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 10
                while sum([await redis.xlen(k) for k in backend.outbox_keys()]):
                    assert loop.time() < deadline  # persisted before the cache goes
                    await asyncio.sleep(0.05)
                await redis.delete(f"chat:{{{conv}}}:win", f"chat:{{{conv}}}:epoch")
            finally:
                await redis.aclose()
            other = await connect(b, "alice")
            again = await other.join(conv, Since(reply.end.message.offset, joined.epoch))
            assert not again.recovered and again.epoch != joined.epoch
            assert again.messages[0].text == "kept in the store"
            sent = await other.send(conv, "after the flush")
            assert sent.offset == reply.end.message.offset + 1  # offsets never go back
            await other.close()
        finally:
            await alice.close()


class _Restartable(Protocol):
    url: str

    def restart(self) -> None: ...


@pytest.fixture(params=["single", "cluster"])
def aof_backend(request: pytest.FixtureRequest) -> Iterator[tuple[_Restartable, tuple[str, ...]]]:
    """Redis with AOF, alone or as a three-master cluster, that can restart in place."""
    if request.param == "single":
        single = RedisServer(appendonly=True)
        single.start()
        single_any: Any = single
        single_any.restart = lambda: (single.stop(), single.start())
        yield single_any, ()
        single.close()
    else:
        cluster = RedisClusterServer(appendonly=True)
        cluster.start()
        yield cluster, ("--redis-cluster", "yes")
        cluster.close()


async def test_redis_restart_mid_traffic_loses_nothing(
    tmp_path: Path, aof_backend: tuple[_Restartable, tuple[str, ...]]
) -> None:
    redis, args = aof_backend
    # Ten questions in a row, their replies held up by the restart: the queue bound is not
    # what this test is about (a refused send would be one more message to account for).
    env = {"CHAT_MAX_QUEUED_REPLIES": "1000"}
    with instances(tmp_path, redis.url, count=2, args=args, env=env) as (a, b):
        conv = await _conversation(a.url, "alice", ["bob"])
        alice = await connect(a, "alice")
        bob = await connect(b, "bob")
        acked: list[str] = []
        await alice.join(conv)
        joined = await bob.join(conv)
        for i in range(5):
            acked.append((await alice.send(conv, f"before {i}")).message_id)
        await asyncio.to_thread(redis.restart)  # same ports, AOF replayed
        # Both instances come back by themselves; their clients are told to rejoin.
        for client in (alice, bob):
            # (replies in flight may end in errors meanwhile: not what this test is about)
            notice = await client.expect(Reconnect, timeout=30, errors=False)
            assert notice.reason == "event stream interrupted"
            with pytest.raises(Closed):
                while True:
                    await client.next_frame(timeout=10)
        # Connecting as a client does: told `unavailable` while Redis comes back, again later
        alice = await connect_when_ready(a, "alice")
        bob = await connect_when_ready(b, "bob")
        # A node of a cluster may still be loading its AOF when another already answers:
        # a join is then told `unavailable` too, and a client joins again after the delay.
        await alice.join_reliably(conv)
        again = await bob.join_reliably(conv, Since(0, joined.epoch))
        assert again.recovered  # the window survived in the AOF
        for i in range(5):
            acked.append((await alice.send_reliably(conv, f"after {i}")).message_id)
        await alice.close()
        await bob.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while True:  # the batch writers drain the outbox into the store
            ids = _stored_user_messages(tmp_path / "shared.sqlite3", conv)
            if sorted(ids) == sorted(acked):
                break
            assert loop.time() < deadline, f"missing: {set(acked) - set(ids)}"
            await asyncio.sleep(0.1)
        assert len(ids) == len(set(ids)) == 10
