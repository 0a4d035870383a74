"""The tick-pipelined Redis client against a real Redis: one round trip for the commands of a
tick, each caller its own answer or error, and nothing held by a blocking command."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import uvloop
from redis import Redis as SyncRedis
from redis.asyncio import Redis
from redis.asyncio.connection import Connection
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from chatserver import keys
from chatserver.backends import make_redis
from chatserver.redis_ticks import TickPipelinedRedis, pack_commands
from chatserver.settings import load
from tests.services import RedisServer


@pytest.fixture(params=["lane", "pooled"])
async def ticked(
    redis_url: str, request: pytest.FixtureRequest
) -> AsyncIterator[TickPipelinedRedis]:
    """Batches on the lane (redis_lane.py), or each on a kept or pooled connection."""
    client = TickPipelinedRedis.from_url(redis_url)
    if request.param == "lane":
        assert await client.open_lane()
    else:
        client.lean_replies = False
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def pooled(redis_url: str) -> AsyncIterator[TickPipelinedRedis]:
    """Without a lane: what kept connections do."""
    client = TickPipelinedRedis.from_url(redis_url)
    client.lean_replies = False
    try:
        yield client
    finally:
        await client.aclose()


async def _reads(probe: Redis) -> int:
    """Request reads Redis has handled: one per round trip (chatload.redisstat)."""
    return int((await probe.info("stats"))["total_reads_processed"])


async def test_the_commands_of_one_tick_share_one_round_trip(
    ticked: TickPipelinedRedis, redis_url: str
) -> None:
    await ticked.ping()  # the pooled connection exists: its HELLO/handshake are not counted
    probe = Redis.from_url(redis_url)
    before_reads, before_batches = await _reads(probe), ticked.batches
    results = await asyncio.gather(*(ticked.incr(f"k{i % 5}") for i in range(50)))
    # the 50 increments of 5 keys, each caller its own answer, in the order issued
    assert sorted(results) == sorted(n for _ in range(5) for n in range(1, 11))
    assert [results[i] for i in range(0, 50, 5)] == list(range(1, 11))
    assert ticked.batches - before_batches == 1
    # one read for the 50, one for the probe's second INFO
    assert await _reads(probe) - before_reads == 2
    await probe.aclose()


async def test_commands_of_later_ticks_go_in_later_batches(ticked: TickPipelinedRedis) -> None:
    before = ticked.batches
    for i in range(3):
        await ticked.set(f"seq{i}", i)
    assert ticked.batches - before == 3
    assert await ticked.mget("seq0", "seq1", "seq2") == [b"0", b"1", b"2"]


async def _clients(probe: Redis) -> int:
    return int((await probe.info("clients"))["connected_clients"])


async def test_batches_one_after_another_keep_one_connection(
    pooled: TickPipelinedRedis, redis_url: str
) -> None:
    ticked = pooled
    probe = Redis.from_url(redis_url)
    await probe.ping()
    alone = await _clients(probe)
    for i in range(20):
        await asyncio.gather(ticked.set(f"one{i}", i), ticked.get(f"one{i}"))
    assert await _clients(probe) == alone + 1  # kept: not one per batch, nor a pool of them
    # a server error leaves it fit for the next batch
    with pytest.raises(ResponseError):
        await ticked.execute_command("NO-SUCH-COMMAND")
    assert await ticked.get("one19") == b"19"
    assert await _clients(probe) == alone + 1
    await probe.aclose()


async def test_a_batch_leaves_before_any_task_runs(
    ticked: TickPipelinedRedis, redis_url: str
) -> None:
    """Written by the callback that closes the batch (on the lane, or a kept connection): a
    loop busy with other work (here: a blocking wait) does not hold it for another pass
    until a task that reads it runs."""
    await ticked.ping()  # a kept connection
    issued = asyncio.create_task(ticked.incr("early"))
    await asyncio.sleep(0)  # the task issues its command; the batch closes next pass
    await asyncio.sleep(0)  # that pass ran: the batch is written, its reader not yet run
    probe = SyncRedis.from_url(redis_url)
    deadline = time.monotonic() + 5
    # Blocking reads hold the loop on purpose: only a write already made can get through.
    while probe.get("early") is None and time.monotonic() < deadline:
        pass
    assert probe.get("early") == b"1"
    probe.close()
    assert await issued == 1


async def _server_drops_a_kept_connection(redis_url: str) -> None:
    retrying = make_redis(load({"redis_url": redis_url}, {}))  # the app's, with its retries
    assert isinstance(retrying, TickPipelinedRedis)
    retrying.lean_replies = False  # kept connections (tests/chatserver/test_redis_lane.py)
    try:
        await retrying.set("kept", 1)
        probe = Redis.from_url(redis_url)
        assert await probe.client_kill_filter(_type="normal", skipme=True) >= 1
        await probe.ping()  # the loop has read the kept connection's end by now
        async with asyncio.timeout(10):
            assert await asyncio.gather(retrying.incr("kept"), retrying.get("kept")) == [2, b"2"]
        await probe.aclose()
    finally:
        await retrying.aclose()


async def _a_kept_connection_lost_before_the_batch(redis_url: str) -> None:
    retrying = make_redis(load({"redis_url": redis_url}, {}))
    assert isinstance(retrying, TickPipelinedRedis)
    retrying.lean_replies = False
    try:
        await retrying.set("lost", 1)
        [kept] = retrying._idle
        kept._writer.transport.abort()  # lost as a reset or a failed keepalive loses it
        await asyncio.sleep(0)  # the loop learns of it
        async with asyncio.timeout(10):
            assert await asyncio.gather(retrying.incr("lost"), retrying.get("lost")) == [2, b"2"]
    finally:
        await retrying.aclose()


def test_a_kept_connection_lost_before_the_batch_is_replaced(redis_url: str) -> None:
    """On uvloop a closed transport refuses writes: the batch goes on a new connection."""
    uvloop.run(_a_kept_connection_lost_before_the_batch(redis_url))
    asyncio.run(_a_kept_connection_lost_before_the_batch(redis_url))


async def test_a_kept_connection_the_server_dropped_is_replaced(redis_url: str) -> None:
    """Redis restarted, or closed an idle client: the next batch reconnects (the client's
    retry) instead of failing on the dead socket."""
    await _server_drops_a_kept_connection(redis_url)


def test_a_kept_connection_the_server_dropped_is_replaced_on_uvloop(redis_url: str) -> None:
    """The same on the server's loop, whose transports refuse a write once closed (asyncio's
    drop it): the batch must not be written on the dead socket, nor lost with it."""
    uvloop.run(_server_drops_a_kept_connection(redis_url))


async def test_an_error_reaches_its_own_caller_only(ticked: TickPipelinedRedis) -> None:
    await ticked.set("text", "not a number")
    good, bad, other = await asyncio.gather(
        ticked.incr("counter"), ticked.incr("text"), ticked.get("text"), return_exceptions=True
    )
    assert good == 1
    assert isinstance(bad, ResponseError)
    assert other == b"not a number"


async def _script_stats(probe: Redis) -> tuple[int, int]:
    """(SCRIPT LOADs, NOSCRIPT errors) Redis has answered so far."""
    commands = await probe.info("commandstats")
    errors = await probe.info("errorstats")
    loads = commands.get("cmdstat_script|load", {}).get("calls", 0)
    return int(loads), int(errors.get("errorstat_NOSCRIPT", {}).get("count", 0))


async def test_a_script_unknown_to_redis_is_loaded_once_for_all_its_callers(
    ticked: TickPipelinedRedis, redis_url: str
) -> None:
    probe = Redis.from_url(redis_url)
    await probe.script_flush()  # none left by an earlier test
    try:
        before = await _script_stats(probe)
        script = ticked.register_script("return redis.call('INCRBY', KEYS[1], ARGV[1])")
        # Its first callers, in one tick and the next: one load, in the first call's batch.
        first = [asyncio.ensure_future(script(keys=["s"], args=[1])) for _ in range(10)]
        await asyncio.sleep(0)
        first += [asyncio.ensure_future(script(keys=["s"], args=[1])) for _ in range(10)]
        assert sorted(await asyncio.gather(*first)) == list(range(1, 21))
        loads, noscripts = await _script_stats(probe)
        assert (loads - before[0], noscripts - before[1]) == (1, 0)
        await ticked.script_flush()  # as after a Redis restart: NOSCRIPT, then one reload
        results = await asyncio.gather(*(script(keys=["s"], args=[1]) for _ in range(10)))
        assert sorted(results) == list(range(21, 31))
        loads, _ = await _script_stats(probe)
        assert loads - before[0] == 2
        assert (await _script_stats(probe))[1] > noscripts  # the restart was noticed
    finally:
        await probe.aclose()


async def test_a_script_that_does_not_compile_fails_its_callers(
    ticked: TickPipelinedRedis,
) -> None:
    script = ticked.register_script("return redis.call(")
    results = await asyncio.gather(
        *(script(keys=[], args=[]) for _ in range(3)), return_exceptions=True
    )
    assert all(isinstance(r, ResponseError) and "compil" in str(r).lower() for r in results)


async def test_a_caller_that_stops_waiting_leaves_the_others_their_answers(
    ticked: TickPipelinedRedis,
) -> None:
    loop = asyncio.get_running_loop()
    waiting = [loop.create_task(ticked.incr("n")) for _ in range(4)]
    await asyncio.sleep(0)  # the four are queued in this tick's batch, not sent yet
    waiting[0].cancel()
    done = await asyncio.gather(*waiting[1:])
    assert waiting[0].cancelled()
    assert sorted(done) == [1, 2, 3]  # the cancelled one was never sent
    assert int(await ticked.get("n") or 0) == 3


async def test_a_blocking_read_does_not_hold_the_batch(ticked: TickPipelinedRedis) -> None:
    await ticked.xgroup_create("stream", "group", id="0", mkstream=True)
    blocked = asyncio.ensure_future(
        ticked.xreadgroup("group", "reader", {"stream": ">"}, count=1, block=5000)
    )
    async with asyncio.timeout(2):
        assert await ticked.set("meanwhile", 1)  # answered while the read is parked
        await ticked.xadd("stream", {"f": "v"})
        entries = await blocked
    assert entries[0][1][0][1] == {b"f": b"v"}


async def test_a_lost_server_fails_every_caller_of_the_batch() -> None:
    server = RedisServer()
    server.start()
    client = TickPipelinedRedis.from_url(server.url, socket_connect_timeout=1)
    try:
        await client.ping()
        server.stop()
        results = await asyncio.gather(
            *(client.incr(f"x{i}") for i in range(5)), return_exceptions=True
        )
        assert all(isinstance(r, RedisConnectionError) for r in results), results
    finally:
        await client.aclose()
        server.close()


@pytest.mark.parametrize(
    "command",
    [
        ("BLPOP", "l", 1),
        ("BZPOPMIN", "z", 1),
        ("BLMOVE", "a", "b", "LEFT", "RIGHT", 1),
        ("XREADGROUP", "GROUP", "g", "c", "BLOCK", 10, "STREAMS", "s", ">"),
        ("WAIT", 0, 10),
    ],
)
def test_commands_the_server_may_hold_are_never_batched(command: tuple[object, ...]) -> None:
    from chatserver.redis_ticks import _blocks

    assert _blocks(command)
    assert not _blocks(("XREADGROUP", "GROUP", "g", "c", "STREAMS", "s", ">"))
    assert not _blocks(("BITCOUNT", "k"))


@pytest.mark.parametrize(
    "command",
    [
        ("GET", "k"),
        ("SET", b"bin\x00key", "välue ✓", "PX", 5000),
        ("EVALSHA", "0369116e46bafcd4e1ef944f8f06872254dcd869", 2, "a", "b", 0, -1, 1.5, 1e20),
        ("SCRIPT LOAD", "return 1"),  # redis-py splits a name with a space
        ("XADD", "s", "*", "m", memoryview(b"payload")),
    ],
)
def test_hiredis_packs_commands_as_redis_py_does(command: tuple[object, ...]) -> None:
    conn = Connection()
    assert b"".join(pack_commands(conn, [command])) == b"".join(conn.pack_commands([command]))


def test_an_argument_redis_py_refuses_is_refused_the_same_way() -> None:
    with pytest.raises(DataError):
        pack_commands(Connection(), [("SET", "k", True)])


@pytest.mark.parametrize("lane", [True, False], ids=["lane", "pooled"])
async def test_a_batch_answered_later_than_the_socket_timeout_fails_and_the_client_goes_on(
    redis_url: str, lane: bool
) -> None:
    """One timer for a batch's replies: past it, a timeout as redis-py gives one (its retry
    takes it), and the connection is not reused with a reply still on its way."""
    client = TickPipelinedRedis.from_url(redis_url, socket_timeout=0.2, retry=Retry(NoBackoff(), 0))
    client.lean_replies = lane
    if lane:
        assert await client.open_lane()
    busy = (
        "local s = redis.call('TIME') "
        "while true do local t = redis.call('TIME') "
        "if (t[1] - s[1]) * 1000000 + (t[2] - s[2]) > 600000 then return 1 end end"
    )
    try:
        await client.ping()
        with pytest.raises(RedisTimeoutError):
            await asyncio.gather(client.eval(busy, 0), client.ping())
        # Redis is still running the script: once it is done, a fresh connection, and each
        # command its own reply (none left over from the batch that timed out).
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while True:
            try:
                assert await client.set("after", 1)
                break
            except RedisTimeoutError:
                assert loop.time() < deadline
        assert await client.get("after") == b"1"
        assert await client.ping()
    finally:
        await client.aclose()


async def test_issued_commands_join_the_tick_as_futures(ticked: TickPipelinedRedis) -> None:
    """No coroutine, no task: the command is in the batch when ``issue`` returns."""
    await ticked.ping()
    before = ticked.batches
    issued = [ticked.issue("INCR", "issued"), ticked.issue("NO-SUCH-COMMAND")]
    issued.append(ticked.issue("GET", "issued"))
    assert all(isinstance(f, asyncio.Future) and not isinstance(f, asyncio.Task) for f in issued)
    answers = await asyncio.gather(*issued, return_exceptions=True)
    assert answers[0] == 1 and isinstance(answers[1], ResponseError) and answers[2] == b"1"
    assert ticked.batches - before == 1


async def test_the_app_loads_every_script_at_start_up(make_harness: Any, redis_url: str) -> None:
    """None waits for its first call to fail NOSCRIPT: all are in Redis before a request."""
    probe = Redis.from_url(redis_url)
    await probe.script_flush()  # none left by an earlier test
    await probe.config_resetstat()
    harness = await make_harness(redis_url=redis_url)
    redis = harness.app[keys.REDIS]
    assert isinstance(redis, TickPipelinedRedis)
    shas = sorted({script.sha for script in redis.scripts})
    assert len(shas) >= 20  # the window's, outbox's, jobs', buffer's, limits', presence's
    try:
        assert await probe.script_exists(*shas) == [True] * len(shas)
        errors = await probe.info("errorstats")
        assert not [name for name in errors if "NOSCRIPT" in name.upper()], errors
    finally:
        await probe.aclose()
