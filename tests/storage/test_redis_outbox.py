"""What only the Redis outbox has: a shared consumer group, reclaiming, poison, shards.

Every test runs on a single Redis and on a three-master Redis Cluster (``redis_clients``).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import msgpack
import pytest

from storage.outbox import redis as redis_outbox
from storage.outbox.redis import RedisOutbox

if TYPE_CHECKING:
    from conftest import MessageFactory, RedisClients


async def make_outbox(clients: RedisClients, consumer: str, **options: Any) -> RedisOutbox:
    """A started outbox on a client of its own, as one instance's would be."""
    options.setdefault("shards", 3 if clients.cluster else 1)
    outbox = RedisOutbox(clients.new(), consumer=consumer, **options)
    await outbox.start()
    return outbox


async def test_a_dead_consumers_entries_are_claimed_after_the_idle_time(
    redis_clients: RedisClients, new_message: MessageFactory
) -> None:
    dead = await make_outbox(redis_clients, "dead", claim_idle_ms=200)
    alive = await make_outbox(redis_clients, "alive", claim_idle_ms=200)
    messages = [new_message("c1") for _ in range(3)]
    for m in messages:
        await dead.add(m)
    taken = await dead.read(10, 1.0)  # ... and then the instance dies without acking
    assert [e.message for e in taken] == messages
    assert await alive.read(10, 0.05) == []  # not idle long enough yet: not taken over
    await asyncio.sleep(0.25)
    claimed = await alive.read(10, 1.0)
    assert [e.message for e in claimed] == messages
    assert alive.reclaimed == 3
    pending = await alive.redis.xpending_range(alive.key_for("c1"), "writers", "-", "+", 10)
    assert {p["consumer"] for p in pending} == {b"alive"}
    await alive.ack([e.entry_id for e in claimed])
    assert await alive.backlog() == 0
    await dead.ack([e.entry_id for e in taken])  # the dead one's late ack is harmless
    assert await alive.backlog() == 0


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
    await outbox.add(good[1])
    entries = await outbox.read(10, 1.0)
    assert [e.message for e in entries] == good
    assert outbox.poisoned == 4
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
    await asyncio.sleep(0.05)  # parked in XREADGROUP ... BLOCK
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader
    message = new_message("c1")
    await outbox.add(message)  # the blocked read that outlived its caller may take it ...
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
    reader = asyncio.create_task(outbox.read(10, 5))
    await asyncio.sleep(0.12)  # past a block or two
    started = loop.time()
    for _ in range(20):  # the same client serves other commands meanwhile, at once
        await outbox.redis.ping()
    assert loop.time() - started < 0.5
    assert not reader.done()
    message = new_message("c1")
    await outbox.add(message)
    entries = await asyncio.wait_for(reader, 5)
    assert [e.message for e in entries] == [message]
