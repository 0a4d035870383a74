"""The subscriber's own pub/sub connection: items handed over as they arrive (in the
callback that received them, no task woken), authentication, Unix sockets, a silent server
noticed; redis-py's kept where ours does not reach (TLS, a cluster's shards)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator, Iterator

import pytest
from redis.asyncio import Redis

from chatserver.fanout.broker.pubsub_conn import (
    LeanPubSub,
    PubSubConnection,
    PubSubItem,
    RedisPyPubSub,
    pubsub_connection,
)

from ...services import RedisServer


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[Redis]:
    redis = Redis.from_url(redis_url)
    yield redis
    await redis.aclose()


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server of this test's own, on TCP and a Unix socket (it may be stopped)."""
    server = RedisServer(unix_socket=True)
    server.start()
    yield server
    if server.pid is not None:
        os.kill(server.pid, signal.SIGCONT)
    server.close()


class Collected:
    """A connection's handler: what it was handed, and from which task (None: handed over
    in the loop's callback that received the bytes)."""

    def __init__(self) -> None:
        self.items: list[PubSubItem] = []
        self.tasks: list[asyncio.Task[object] | None] = []
        self._changed = asyncio.Event()

    def __call__(self, item: PubSubItem) -> None:
        self.items.append(item)
        self.tasks.append(asyncio.current_task())
        self._changed.set()

    def messages(self) -> list[PubSubItem]:
        return [i for i in self.items if i[0] == b"message"]

    async def until(self, item_or_count: PubSubItem | int) -> None:
        async with asyncio.timeout(10):
            while not (
                len(self.messages()) >= item_or_count
                if isinstance(item_or_count, int)
                else item_or_count in self.items
            ):
                self._changed.clear()
                await self._changed.wait()


@contextlib.asynccontextmanager
async def served(conn: PubSubConnection) -> AsyncIterator[asyncio.Task[None]]:
    serving = asyncio.create_task(conn.serve())
    try:
        yield serving
    finally:
        serving.cancel()
        with contextlib.suppress(BaseException):
            await serving
        await conn.close()


def lean(url: str, health_s: float = 15) -> tuple[PubSubConnection, Collected]:
    got = Collected()
    return pubsub_connection(Redis.from_url(url), sharded=False, health_s=health_s, handle=got), got


async def _delivers(
    conn: PubSubConnection, got: Collected, publisher: Redis, channel: bytes, data: bytes
) -> None:
    async with served(conn):
        await conn.send("subscribe", channel)
        await got.until((b"subscribe", channel, 1))
        await publisher.publish(channel, data)
        await got.until(1)
        assert got.messages() == [(b"message", channel, data)]


def test_ours_serves_tcp_and_unix_sockets_redis_py_tls_and_shards(redis_url: str) -> None:
    def made(url: str, *, sharded: bool = False) -> PubSubConnection:
        return pubsub_connection(
            Redis.from_url(url), sharded=sharded, health_s=1, handle=Collected()
        )

    assert isinstance(made(redis_url), LeanPubSub)
    assert isinstance(made("unix:///tmp/redis.sock"), LeanPubSub)
    assert isinstance(made(redis_url.replace("redis://", "rediss://")), RedisPyPubSub)
    assert isinstance(made(redis_url, sharded=True), RedisPyPubSub)


async def test_messages_are_handed_over_in_order_as_they_arrive_with_no_task_woken(
    client: Redis, redis_url: str
) -> None:
    conn, got = lean(redis_url)
    async with served(conn):
        await conn.send("subscribe", b"room")
        await got.until((b"subscribe", b"room", 1))
        pipe = client.pipeline(transaction=False)
        for n in range(200):
            pipe.publish("room", f"m{n}")
        await pipe.execute()
        await got.until(200)
        messages = got.messages()
        assert [data for _, _, data in messages] == [f"m{n}".encode() for n in range(200)]
        assert {channel for _, channel, _ in messages} == {b"room"}
        # In the loop's callback that received the bytes: no task is woken to read them.
        assert set(got.tasks) == {None}
        await conn.send("unsubscribe", b"room")
        await got.until((b"unsubscribe", b"room", 0))


@pytest.mark.parametrize("kind", [LeanPubSub, RedisPyPubSub])
async def test_a_handler_that_fails_costs_one_message_not_the_connection(
    client: Redis, redis_url: str, caplog: pytest.LogCaptureFixture, kind: type
) -> None:
    got = Collected()

    def handle(item: PubSubItem) -> None:
        if item[2] == b"bad":
            raise ValueError("cannot handle this one")
        got(item)

    conn: PubSubConnection
    if kind is LeanPubSub:
        conn = pubsub_connection(
            Redis.from_url(redis_url), sharded=False, health_s=15, handle=handle
        )
    else:
        conn = RedisPyPubSub(Redis.from_url(redis_url), sharded=False, handle=handle)
    await conn.send("subscribe", b"room")  # first: redis-py serves no connection without one
    async with served(conn) as serving:
        await got.until((b"subscribe", b"room", 1))
        for data in (b"one", b"bad", b"two"):
            await client.publish("room", data)
        await got.until(2)
        assert [data for _, _, data in got.messages()] == [b"one", b"two"]
        assert not serving.done()
    assert "could not be handled" in caplog.text


async def test_serving_ends_with_an_error_when_redis_closes_the_connection(
    client: Redis, redis_url: str
) -> None:
    conn, got = lean(redis_url)
    async with served(conn) as serving:
        await conn.send("subscribe", b"gone")
        await got.until((b"subscribe", b"gone", 1))
        await client.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        with pytest.raises(ConnectionError, match="closed"):
            async with asyncio.timeout(10):
                await serving
        with pytest.raises(ConnectionError, match="lost"):
            await conn.send("subscribe", b"again")


async def test_it_authenticates_as_the_urls_user(client: Redis, redis_url: str) -> None:
    await client.execute_command("ACL", "SETUSER", "listener", "on", ">s3cret", "&*", "+@all")
    try:
        conn, got = lean(redis_url.replace("redis://", "redis://listener:s3cret@"))
        await _delivers(conn, got, client, b"private", b"hello")
        refused, _ = lean(redis_url.replace("redis://", "redis://listener:nope@"))
        with pytest.raises(ConnectionError, match="AUTH"):
            await refused.send("subscribe", b"private")
        await refused.close()
    finally:
        await client.execute_command("ACL", "DELUSER", "listener")


async def test_a_unix_socket(own_redis: RedisServer) -> None:
    conn, got = lean(f"unix://{own_redis.socket_path}")
    publisher = Redis.from_url(own_redis.url)
    try:
        await _delivers(conn, got, publisher, b"local", b"over the socket")
    finally:
        await publisher.aclose()


async def test_a_quiet_connection_is_asked_and_a_silent_server_is_lost(
    own_redis: RedisServer,
) -> None:
    conn, got = lean(own_redis.url, health_s=0.2)
    probe = Redis.from_url(own_redis.url)
    try:
        async with served(conn) as serving:
            await conn.send("subscribe", b"quiet")
            await got.until((b"subscribe", b"quiet", 1))
            # Quiet but alive: the PING's answer keeps it (never handed over as a message).
            done, _ = await asyncio.wait({serving}, timeout=1.0)
            assert not done  # still serving, through the PINGs answered
            stats = await probe.info("commandstats")
            assert stats["cmdstat_ping"]["calls"] >= 2
            assert got.items == [(b"subscribe", b"quiet", 1)]
            assert own_redis.pid is not None
            os.kill(own_redis.pid, signal.SIGSTOP)  # silent, its socket open
            with pytest.raises(ConnectionError, match="PING"):
                async with asyncio.timeout(10):
                    await serving
    finally:
        await probe.aclose()
