"""The subscriber's own pub/sub connection: batches, authentication, Unix sockets, a silent
server noticed; redis-py's kept where ours does not reach (TLS, a cluster's shards)."""

from __future__ import annotations

import asyncio
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


async def _read_until(conn: PubSubConnection, count: int) -> tuple[list[PubSubItem], int]:
    """(the first ``count`` messages, how many reads brought them)."""
    got: list[PubSubItem] = []
    reads = 0
    async with asyncio.timeout(10):
        while len([i for i in got if i[0] == b"message"]) < count:
            got += await conn.read()
            reads += 1
    return [i for i in got if i[0] == b"message"], reads


async def _subscribed(conn: PubSubConnection, channel: bytes) -> None:
    await conn.send("subscribe", channel)
    async with asyncio.timeout(10):
        while (b"subscribe", channel, 1) not in await conn.read():
            pass


async def _delivers(conn: PubSubConnection, publisher: Redis, channel: bytes, data: bytes) -> None:
    await _subscribed(conn, channel)
    await publisher.publish(channel, data)
    messages, _ = await _read_until(conn, 1)
    assert messages == [(b"message", channel, data)]


def test_ours_serves_tcp_and_unix_sockets_redis_py_tls_and_shards(redis_url: str) -> None:
    assert isinstance(
        pubsub_connection(Redis.from_url(redis_url), sharded=False, health_s=1), LeanPubSub
    )
    unix = Redis.from_url("unix:///tmp/redis.sock")
    assert isinstance(pubsub_connection(unix, sharded=False, health_s=1), LeanPubSub)
    tls = Redis.from_url(redis_url.replace("redis://", "rediss://"))
    assert isinstance(pubsub_connection(tls, sharded=False, health_s=1), RedisPyPubSub)
    shard = Redis.from_url(redis_url)
    assert isinstance(pubsub_connection(shard, sharded=True, health_s=1), RedisPyPubSub)


async def test_messages_that_arrived_together_are_read_together_in_order(
    client: Redis, redis_url: str
) -> None:
    conn = pubsub_connection(Redis.from_url(redis_url), sharded=False, health_s=15)
    try:
        await _subscribed(conn, b"room")
        pipe = client.pipeline(transaction=False)
        for n in range(200):
            pipe.publish("room", f"m{n}")
        await pipe.execute()
        messages, reads = await _read_until(conn, 200)
        assert [data for _, _, data in messages] == [f"m{n}".encode() for n in range(200)]
        assert {channel for _, channel, _ in messages} == {b"room"}
        assert reads < 20  # batches, not a read per message
        await conn.send("unsubscribe", b"room")
        async with asyncio.timeout(10):
            assert (b"unsubscribe", b"room", 0) in await conn.read()
    finally:
        await conn.close()


async def test_it_authenticates_as_the_urls_user(client: Redis, redis_url: str) -> None:
    await client.execute_command("ACL", "SETUSER", "listener", "on", ">s3cret", "&*", "+@all")
    try:
        url = redis_url.replace("redis://", "redis://listener:s3cret@")
        conn = pubsub_connection(Redis.from_url(url), sharded=False, health_s=15)
        try:
            await _delivers(conn, client, b"private", b"hello")
        finally:
            await conn.close()
        wrong = Redis.from_url(redis_url.replace("redis://", "redis://listener:nope@"))
        refused = pubsub_connection(wrong, sharded=False, health_s=15)
        with pytest.raises(ConnectionError, match="AUTH"):
            await refused.send("subscribe", b"private")
        await refused.close()
    finally:
        await client.execute_command("ACL", "DELUSER", "listener")


async def test_a_unix_socket(own_redis: RedisServer) -> None:
    conn = pubsub_connection(
        Redis.from_url(f"unix://{own_redis.socket_path}"), sharded=False, health_s=15
    )
    publisher = Redis.from_url(own_redis.url)
    try:
        await _delivers(conn, publisher, b"local", b"over the socket")
    finally:
        await conn.close()
        await publisher.aclose()


async def test_a_quiet_connection_is_asked_and_a_silent_server_is_lost(
    own_redis: RedisServer,
) -> None:
    conn = pubsub_connection(Redis.from_url(own_redis.url), sharded=False, health_s=0.2)
    probe = Redis.from_url(own_redis.url)
    try:
        await _subscribed(conn, b"quiet")
        # Quiet but alive: the PING's answer keeps it (never handed over as a message).
        reading = asyncio.create_task(conn.read())
        done, _ = await asyncio.wait({reading}, timeout=1.0)
        assert not done  # still waiting, through the PINGs answered
        stats = await probe.info("commandstats")
        assert stats["cmdstat_ping"]["calls"] >= 2
        assert own_redis.pid is not None
        os.kill(own_redis.pid, signal.SIGSTOP)  # silent, its socket open
        with pytest.raises(ConnectionError, match="PING"):
            async with asyncio.timeout(10):
                await reading
    finally:
        await conn.close()
        await probe.aclose()
