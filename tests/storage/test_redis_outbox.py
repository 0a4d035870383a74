"""What only the Redis outbox has: a shared consumer group, reclaiming, poison, shards.

Every test runs on a single Redis and on a three-master Redis Cluster (``redis_clients``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import msgpack
import pytest
from redis.asyncio import Redis

from storage.outbox import redis as redis_outbox
from storage.outbox.redis import RedisOutbox
from storage.records import OutboxEntry

if TYPE_CHECKING:
    from conftest import MessageFactory, RedisClients

T = TypeVar("T")


async def make_outbox(clients: RedisClients, consumer: str, **options: Any) -> RedisOutbox:
    """A started outbox on a client of its own (named ``outbox-<consumer>`` on the server),
    as one instance's would be."""
    options.setdefault("shards", 3 if clients.cluster else 1)
    client = clients.new(client_name=f"outbox-{consumer}")
    outbox = RedisOutbox(client, consumer=consumer, **options)
    await outbox.start()
    return outbox


async def _on_every_node(
    clients: RedisClients, command: Callable[[Redis], Awaitable[T]]
) -> list[T]:
    """``command`` on a plain client of each server: the single Redis, or each cluster node."""
    if clients.cluster:
        cluster = clients.new()
        await cluster.initialize()
        addresses = [(n.host, n.port) for n in cluster.get_nodes()]
    else:
        one = Redis.from_url(clients.url)
        addresses = [
            (
                one.connection_pool.connection_kwargs["host"],
                one.connection_pool.connection_kwargs["port"],
            )
        ]
        await one.aclose()
    out = []
    for host, port in addresses:
        node = Redis(host=host, port=port)
        try:
            out.append(await command(node))
        finally:
            await node.aclose()
    return out


async def parked_reads(clients: RedisClients, consumer: str) -> int:
    """The outbox's XREADGROUP ... BLOCK calls parked on the servers right now (CLIENT LIST:
    its connections blocked in ``xreadgroup``)."""

    async def count(node: Redis) -> int:
        return sum(
            1
            for c in await node.client_list()
            if c.get("name") == f"outbox-{consumer}"
            and "b" in c["flags"]
            and c["cmd"] == "xreadgroup"
        )

    return sum(await _on_every_node(clients, count))


async def xreadgroup_calls(clients: RedisClients) -> int:
    """XREADGROUP calls the servers have finished so far (a parked one counts once it ends)."""

    async def calls(node: Redis) -> int:
        stats = await node.info("commandstats")
        return int(stats.get("cmdstat_xreadgroup", {}).get("calls", 0))

    return sum(await _on_every_node(clients, calls))


async def eventually(condition: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    """Poll ``condition`` until it holds; fail after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await condition():
        assert loop.time() < deadline, f"not within {timeout} s: {what}"
        await asyncio.sleep(0.01)


def units(clients: RedisClients, outbox: RedisOutbox) -> int:
    """Blocking reads one ``read`` parks: one for every shard on a single Redis, one a shard
    on a cluster."""
    return outbox.shards if clients.cluster else 1


async def test_a_dead_consumers_entries_are_claimed_after_the_idle_time(
    redis_clients: RedisClients, new_message: MessageFactory
) -> None:
    # Idle time long enough that a loaded machine still reads "too early" within it.
    dead = await make_outbox(redis_clients, "dead", claim_idle_ms=1000)
    alive = await make_outbox(redis_clients, "alive", claim_idle_ms=1000)
    messages = [new_message("c1") for _ in range(3)]
    for m in messages:
        await dead.add(m)
    loop = asyncio.get_running_loop()
    taken_at = loop.time()
    taken = await dead.read(10, 1.0)  # ... and then the instance dies without acking
    assert [e.message for e in taken] == messages
    assert await alive.read(10, 0.05) == []  # not idle long enough yet: not taken over
    claimed: list[OutboxEntry] = []
    async with asyncio.timeout(10):
        while not claimed:
            claimed = await alive.read(10, 0.1)
    assert loop.time() - taken_at >= 1.0  # once idle for the whole claim time, not before
    assert [e.message for e in claimed] == messages
    assert alive.reclaimed == 3
    pending = await alive.redis.xpending_range(alive.key_for("c1"), "writers", "-", "+", 10)
    assert {p["consumer"] for p in pending} == {b"alive"}
    await alive.ack([e.entry_id for e in claimed])
    assert await alive.backlog() == 0
    await dead.ack([e.entry_id for e in taken])  # the dead one's late ack is harmless
    assert await alive.backlog() == 0


async def test_a_long_idle_read_still_claims_in_time(
    redis_clients: RedisClients, new_message: MessageFactory
) -> None:
    """An idle read waits long (a batch writer's second, here a minute) but ends by the next
    claim of dead consumers' entries: a long wait does not delay a takeover."""
    dead = await make_outbox(redis_clients, "dead", claim_idle_ms=1000)
    alive = await make_outbox(redis_clients, "alive", claim_idle_ms=1000)
    message = new_message("c1")
    await dead.add(message)
    assert [e.message for e in await dead.read(10, 1.0)] == [message]  # then it dies
    async with asyncio.timeout(10):  # a minute's wait would pass it
        claimed: list[OutboxEntry] = []
        while not claimed:
            claimed = await alive.read(10, 60.0)
    assert [e.message for e in claimed] == [message] and alive.reclaimed == 1


async def test_instances_share_the_group_and_never_get_an_entry_twice(
    redis_clients: RedisClients, new_message: MessageFactory
) -> None:
    boxes = [await make_outbox(redis_clients, f"w{i}") for i in range(2)]
    cids = [f"c{i}" for i in range(6)]  # spread over the shards
    for i in range(60):
        await boxes[i % 2].add(new_message(cids[i % 6]))
    got: list[int] = []
    per_box = [0, 0]
    for _ in range(50):
        if len(got) >= 60:
            break
        results = await asyncio.gather(*(box.read(7, 0.05) for box in boxes))
        for i, entries in enumerate(results):
            per_box[i] += len(entries)
            got.extend(hash((e.message.conversation_id, e.message.offset)) for e in entries)
            await boxes[i].ack([e.entry_id for e in entries])
    assert len(got) == 60 and len(set(got)) == 60
    assert all(per_box)  # both instances took a share
    assert await boxes[0].backlog() == 0


async def test_a_batch_past_luas_unpack_limit_is_acked_and_deleted_whole(
    redis_clients: RedisClients, new_message: MessageFactory
) -> None:
    """The ack is one script a shard, which slices its ids: Lua's unpack() takes at most
    8,000 values, and a batch may hold 10,000 entries."""
    outbox = await make_outbox(redis_clients, "w")
    for _ in range(9_000 // 20):  # 20 at once: the client's pool is bounded
        await asyncio.gather(*(outbox.add(new_message("c0")) for _ in range(20)))
    entries = await outbox.read(10_000, 1.0)
    assert len(entries) == 9_000
    await outbox.ack([e.entry_id for e in entries])
    assert await outbox.backlog() == 0
    pending = [await outbox.redis.xpending(key, outbox.group) for key in outbox.keys]
    assert [p["pending"] for p in pending] == [0] * len(outbox.keys)


async def test_shards_keep_a_conversation_together_and_add_up(
    redis_clients: RedisClients, new_message: MessageFactory
) -> None:
    outbox = await make_outbox(redis_clients, "w", shards=3)
    assert len(set(outbox.keys)) == 3
    cids = [f"c{i}" for i in range(12)]
    assert len({outbox.shard_for(c) for c in cids}) == 3
    for cid in cids:
        for _ in range(2):
            await outbox.add(new_message(cid))
    for key in outbox.keys:
        assert await outbox.redis.xlen(key) > 0
    assert await outbox.backlog() == 24
    entries = await outbox.read(100, 1.0)
    assert len(entries) == 24
    for cid in cids:  # one conversation's entries stay in order
        assert [e.message.offset for e in entries if e.message.conversation_id == cid] == [1, 2]


async def test_undecodable_entries_are_dropped_not_retried_forever(
    redis_clients: RedisClients, new_message: MessageFactory
) -> None:
    outbox = await make_outbox(redis_clients, "w")
    good = [new_message("c1") for _ in range(2)]
    key = outbox.key_for("c1")
    await outbox.add(good[0])
    await outbox.redis.xadd(key, {b"m": b"\xc1 not msgpack"})
    await outbox.redis.xadd(key, {b"x": b"no payload"})
    await outbox.redis.xadd(key, {b"m": msgpack.packb({"id": "m-1", "text": "no offset"})})
    await outbox.redis.xadd(key, {b"m": msgpack.packb([1, 2, 3])})
    wrong = {"id": 5, "conversation_id": "c1", "role": "user", "text": "an id of the wrong type"}
    await outbox.redis.xadd(key, {b"m": msgpack.packb(wrong), b"o": 3, b"t": 1})
    await outbox.add(good[1])
    entries = await outbox.read(10, 1.0)
    assert [e.message for e in entries] == good
    assert outbox.poisoned == 5
    assert await outbox.backlog() == 2  # the poison is acked and deleted already
    await outbox.ack([e.entry_id for e in entries])
    assert await outbox.backlog() == 0
    assert await outbox.read(10, 0.01) == []


async def test_entries_whose_read_reply_was_lost_come_back_at_once(
    redis_clients: RedisClients, new_message: MessageFactory
) -> None:
    outbox = await make_outbox(redis_clients, "w")  # claim_idle_ms: 30 s
    first = [new_message("c1") for _ in range(3)]
    for m in first:
        await outbox.add(m)
    # A read that Redis served but whose reply never arrived (the connection dropped, Redis
    # restarted): the entries are pending for this consumer, and nobody has them.
    await outbox.redis.xreadgroup("writers", "w", {outbox.key_for("c1"): ">"}, count=10)
    taken = await asyncio.wait_for(outbox.read(10, 1.0), 5)
    assert [e.message for e in taken] == first  # not 30 s later, as a dead consumer's
    # Entries handed out and not acked yet are the writer's: never taken back twice.
    second = new_message("c1")
    await outbox.add(second)
    await outbox.redis.xreadgroup("writers", "w", {outbox.key_for("c1"): ">"}, count=10)
    outbox._recover = True  # as after a failed read
    again = await asyncio.wait_for(outbox.read(10, 1.0), 5)
    assert [e.message for e in again] == [second]
    await outbox.ack([e.entry_id for e in taken + again])
    assert await outbox.backlog() == 0


async def test_a_cancelled_read_loses_nothing(
    redis_clients: RedisClients, new_message: MessageFactory
) -> None:
    outbox = await make_outbox(redis_clients, "w")
    reader = asyncio.create_task(outbox.read(10, 30))

    async def parked() -> bool:
        return await parked_reads(redis_clients, "w") == units(redis_clients, outbox)

    await eventually(parked, 5, "the read parked in XREADGROUP ... BLOCK on every shard")
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader
    assert await parked_reads(redis_clients, "w") == units(redis_clients, outbox)  # still there
    message = new_message("c1")
    await outbox.add(message)  # the blocked read that outlived its caller takes it ...
    entries = await asyncio.wait_for(outbox.read(10, 5), 5)  # ... and hands it on
    assert [e.message for e in entries] == [message]


async def test_a_blocked_read_neither_starves_the_client_nor_outstays_its_wait(
    redis_clients: RedisClients, new_message: MessageFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(redis_outbox, "_BLOCK_CHUNK_S", 0.05)  # several blocks per read
    outbox = await make_outbox(redis_clients, "w")
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await outbox.read(10, 0.2) == []
    assert 0.19 <= loop.time() - started < 1.0
    shards = units(redis_clients, outbox)

    async def none_parked() -> bool:  # the block left over from the read above is over
        return await parked_reads(redis_clients, "w") == 0

    await eventually(none_parked, 3, "the last read's block over")
    reader = asyncio.create_task(outbox.read(10, 5))

    async def parked() -> bool:
        return await parked_reads(redis_clients, "w") == shards

    await eventually(parked, 3, "the read parked in XREADGROUP ... BLOCK on every shard")
    before = await xreadgroup_calls(redis_clients)

    async def past_a_block() -> bool:  # each shard's block ended, and the next one parked
        done = await xreadgroup_calls(redis_clients) - before
        return done >= shards and await parked_reads(redis_clients, "w") == shards

    await eventually(past_a_block, 3, "a block over and the next one parked, on every shard")
    started = loop.time()
    for _ in range(20):  # the same client serves other commands meanwhile, at once
        await outbox.redis.ping()
    assert loop.time() - started < 0.5
    assert not reader.done()
    message = new_message("c1")
    await outbox.add(message)
    entries = await asyncio.wait_for(reader, 5)
    assert [e.message for e in entries] == [message]
