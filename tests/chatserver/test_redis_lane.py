"""The lane against a real Redis: batches pipelined on one connection, each reply through the
client's own callback as it arrives, and a lane lost with commands in flight."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator

import pytest
import uvloop
from redis.asyncio import Redis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ConstantBackoff, NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.retry import Retry

from chatserver import redis_ticks
from chatserver.backends import make_redis
from chatserver.redis_ticks import TickPipelinedRedis
from chatserver.settings import load
from tests.services import RedisServer, redis_command

from .conftest import eventually


@pytest.fixture
async def laned(redis_url: str) -> AsyncIterator[TickPipelinedRedis]:
    client = make_redis(load({"redis_url": redis_url}, {}))  # the app's, with its retries
    assert isinstance(client, TickPipelinedRedis)
    assert await client.open_lane()
    try:
        yield client
    finally:
        await client.aclose()


async def _clients(probe: Redis) -> int:
    return int((await probe.info("clients"))["connected_clients"])


async def test_batches_of_later_ticks_ride_one_connection_without_waiting(
    laned: TickPipelinedRedis, redis_url: str, redis_server: RedisServer
) -> None:
    probe = Redis.from_url(redis_url)
    try:
        alone = await _clients(probe)
        lane = laned._lane
        assert lane is not None
        issued = []
        pid = redis_server.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)  # no reply comes until the three are out
        try:
            for _ in range(3):  # three ticks, three batches
                issued += [laned.issue("INCR", "n"), laned.issue("GET", "n")]
                await asyncio.sleep(0)  # the tick's batch is written in the next pass
            assert lane.in_flight == 6  # each written without waiting for the one before
        finally:
            os.kill(pid, signal.SIGCONT)
        async with asyncio.timeout(10):
            assert await asyncio.gather(*issued) == [1, b"1", 2, b"2", 3, b"3"]
        assert await _clients(probe) == alone  # the lane is the client's only connection
        assert laned._idle == []
    finally:
        await probe.aclose()


async def test_replies_go_through_the_clients_own_callbacks(
    laned: TickPipelinedRedis, redis_url: str
) -> None:
    """What redis-py's own reading gives each command, the lane gives too."""
    plain = Redis.from_url(redis_url)
    try:
        await plain.hset("h", mapping={"a": 1, "b": "two"})
        await plain.zadd("z", {"x": 1.5, "y": 2})
        calls = [
            ("hgetall", ("h",), {}),
            ("exists", ("h", "nothing"), {}),
            ("set", ("s", "v"), {"nx": True}),
            ("set", ("s", "w"), {"nx": True}),
            ("zrange", ("z", 0, -1), {"withscores": True}),
            ("ttl", ("h",), {}),
            ("ping", (), {}),
            ("info", ("server",), {}),
        ]
        got = await asyncio.gather(*(getattr(laned, n)(*a, **kw) for n, a, kw in calls))
        assert laned._lane is not None and laned._lane.in_flight == 0
        await plain.delete("s")
        want = [await getattr(plain, n)(*a, **kw) for n, a, kw in calls]
        assert got[:-1] == want[:-1]
        assert got[-1]["redis_version"] == want[-1]["redis_version"]
    finally:
        await plain.aclose()


async def _lost_with_commands_in_flight(laned: TickPipelinedRedis) -> None:
    lane = laned._lane
    assert lane is not None
    issued = [laned.issue("SET", "k", "v"), laned.issue("GET", "k")]
    await asyncio.sleep(0)  # written in this pass; no reply can be read before the next
    assert lane.in_flight == 2
    lane._transport.abort()  # a reset, a failed keepalive
    async with asyncio.timeout(10):
        assert await asyncio.gather(*issued) == [True, b"v"]
        assert lane.lost and laned._lane is None
        assert await laned.get("k") == b"v"  # this batch opens the next lane
        assert await laned.open_lane()
    assert laned.lanes_opened == 2 and laned._lane is not lane


async def test_a_lane_lost_with_commands_in_flight_answers_them_again(
    laned: TickPipelinedRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Written, then the connection is gone before a reply was read: the commands go out
    again on another connection (the client's retry), and a new lane takes over later."""
    monkeypatch.setattr(redis_ticks, "LANE_RETRY_S", 0.0)
    await _lost_with_commands_in_flight(laned)


def test_a_lane_lost_with_commands_in_flight_on_uvloop(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same on the server's loop (its transports take a new protocol their own way)."""
    monkeypatch.setattr(redis_ticks, "LANE_RETRY_S", 0.0)

    async def run() -> None:
        client = make_redis(load({"redis_url": redis_url}, {}))
        assert isinstance(client, TickPipelinedRedis)
        try:
            assert await client.open_lane()
            assert await client.incr("on-uvloop") == 1
            await _lost_with_commands_in_flight(client)
        finally:
            await client.aclose()

    uvloop.run(run())


async def test_a_lane_closed_fails_what_it_still_owes(
    laned: TickPipelinedRedis, redis_server: RedisServer
) -> None:
    """The client closing, after its wait for the replies in flight: none hangs."""
    pid = redis_server.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)  # nothing is answered
    try:
        owed = laned.issue("GET", "k")
        await asyncio.sleep(0)
        lane = laned._lane
        assert lane is not None and lane.in_flight == 1
        laned._lane = None  # as aclose takes it
        lane.close()
        with pytest.raises(RedisConnectionError):
            await asyncio.wait_for(owed, 5)
    finally:
        os.kill(pid, signal.SIGCONT)
    await laned._retire(lane.conn)


async def test_a_lane_lost_without_retries_fails_its_commands(redis_url: str) -> None:
    client = TickPipelinedRedis.from_url(redis_url, retry=Retry(NoBackoff(), 0))
    try:
        assert await client.open_lane()
        lane = client._lane
        assert lane is not None
        issued = [client.issue("INCR", "once"), client.issue("INCR", "once")]
        await asyncio.sleep(0)
        lane._transport.abort()
        results = await asyncio.gather(*issued, return_exceptions=True)
        assert all(isinstance(r, RedisConnectionError) for r in results), results
    finally:
        await client.aclose()


async def test_the_app_client_opens_its_lane_at_start(redis_url: str) -> None:
    from chatserver.backends import open_redis

    client = await open_redis(load({"redis_url": redis_url}, {}))
    assert isinstance(client, TickPipelinedRedis)
    try:
        assert client._lane is not None and client.lanes_opened == 1
    finally:
        await client.aclose()


def test_a_lane_needs_replies_as_bytes_over_resp2(redis_url: str) -> None:
    """Decoded replies or RESP3 keep redis-py's reading (the lane feeds hiredis raw RESP2)."""
    assert TickPipelinedRedis.from_url(redis_url).lean_replies
    assert not TickPipelinedRedis.from_url(redis_url, decode_responses=True).lean_replies
    assert not TickPipelinedRedis.from_url(redis_url, protocol=3).lean_replies


async def test_a_lane_whose_socket_is_full_leaves_batches_to_other_connections(
    laned: TickPipelinedRedis, redis_server: RedisServer
) -> None:
    """Redis not reading: once the lane's transport asks to pause, batches go out on pooled
    connections instead of piling up behind it; everything is answered once Redis reads."""
    pid = redis_server.pid
    assert pid is not None
    lane = laned._lane
    assert lane is not None
    value = b"x" * (1 << 20)
    issued: list[asyncio.Future[object]] = []
    os.kill(pid, signal.SIGSTOP)
    try:
        async with asyncio.timeout(10):
            while not lane.paused:  # the kernel's buffers, then the transport's, fill up
                issued.append(laned.issue("SET", f"big{len(issued)}", value))
                await asyncio.sleep(0)  # the tick's batch is written
        on_lane = lane.in_flight
        assert laned._idle == [] and not laned._sending
        later = laned.issue("GET", "big0")
        await asyncio.sleep(0)
        assert lane.in_flight == on_lane  # not behind the paused lane: on a pooled connection
        assert laned._sending
    finally:
        os.kill(pid, signal.SIGCONT)
    async with asyncio.timeout(30):
        assert all(await asyncio.gather(*issued))
        assert await later == value
    assert not lane.lost and not lane.paused


async def test_a_lane_answered_loading_hands_its_commands_back_to_the_retries() -> None:
    """A Redis made the replica of another (a failover, a reconfiguration) loads the
    primary's data while its clients stay connected, answering ``-LOADING`` meanwhile. A
    batch on the lane gets that answer: the lane is dropped and the batch goes back to the
    client, whose retries wait the loading out; the caller gets its value, not the error."""
    primary, replica = RedisServer(), RedisServer()
    try:
        primary.extra_args = ["--repl-diskless-sync-delay", "0"]  # the sync starts at once
        primary.start()
        keys = 5000
        filler = Redis.from_url(primary.url)
        try:
            async with filler.pipeline(transaction=False) as pipe:
                for index in range(keys):
                    pipe.set(f"filler:{index}", index)
                await pipe.execute()
        finally:
            await filler.aclose()
        # 300 µs a key: 1.5 s of loading, events served between keys (Redis's own tests
        # slow loading the same way).
        replica.extra_args = [
            "--key-load-delay", "300",
            "--loading-process-events-interval-bytes", "1024",
        ]  # fmt: skip
        replica.start()
        # Retries without jitter that outlast the loading (the app's ride out ~1.3 s on
        # average, by chance less).
        client = TickPipelinedRedis.from_url(
            replica.url,
            retry=AsyncRetry(ConstantBackoff(0.1), 50),
            retry_on_error=[RedisConnectionError],
        )
        try:
            assert await client.open_lane()
            lane = client._lane
            assert lane is not None
            redis_command(replica.port, "REPLICAOF", primary.host, str(primary.port))
            await eventually(
                lambda: b"loading:1" in redis_command(replica.port, "INFO", "persistence"),
                timeout=20,
                what="the replica loading the primary's data",
            )
            async with asyncio.timeout(20):
                assert await client.get(f"filler:{keys - 1}") == str(keys - 1).encode()
            assert lane.lost  # the LOADING answer dropped it; the retry went another way
            assert b"loading:0" in redis_command(replica.port, "INFO", "persistence")
        finally:
            await client.aclose()
    finally:
        primary.close()
        replica.close()
