"""One suite for every Outbox implementation (see ``OUTBOX_FACTORIES`` in conftest)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import pytest

from storage import Outbox, OutboxFull

if TYPE_CHECKING:
    from conftest import MakeOutbox, MessageFactory

LONG_WAIT_S = 30.0  # a reader that waited this long would fail the test's own 5 s timeout


async def test_entries_come_out_in_order_with_increasing_ids(
    outbox: Outbox, new_message: MessageFactory
) -> None:
    messages = [new_message("c1") for _ in range(12)]  # past 9, where unpadded ids misorder
    for m in messages:
        await outbox.add(m)
    entries = await outbox.read(100, 1.0)
    assert [e.message for e in entries] == messages
    ids = [e.entry_id for e in entries]
    assert ids == sorted(ids) and len(set(ids)) == 12


async def test_read_respects_max_count(outbox: Outbox, new_message: MessageFactory) -> None:
    for _ in range(5):
        await outbox.add(new_message("c1"))
    first = await outbox.read(2, 1.0)
    second = await outbox.read(2, 1.0)
    third = await outbox.read(2, 1.0)
    assert [len(first), len(second), len(third)] == [2, 2, 1]
    offsets = [e.message.offset for e in (*first, *second, *third)]
    assert offsets == [1, 2, 3, 4, 5]  # nothing handed out twice, nothing skipped


async def test_read_times_out_empty(outbox: Outbox) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await asyncio.wait_for(outbox.read(10, 0.05), 5) == []
    assert loop.time() - started >= 0.04


async def test_read_waits_for_the_first_entry(outbox: Outbox, new_message: MessageFactory) -> None:
    message = new_message("c1")
    # Tasks start in creation order, so the reader is parked before the writer adds.
    reader = asyncio.create_task(outbox.read(10, LONG_WAIT_S))
    writer = asyncio.create_task(outbox.add(message))
    entries = await asyncio.wait_for(reader, 5)
    await writer
    assert [e.message for e in entries] == [message]


async def test_interrupt_ends_a_read_s_wait_and_drops_nothing(
    outbox: Outbox, new_message: MessageFactory
) -> None:
    """A stopping writer does not wait out a long read: ``interrupt`` ends the wait (of the
    read waiting now, or of the next), an entry at hand is still handed out, and the read
    after waits for entries as ever."""
    waiting = asyncio.create_task(outbox.read(10, LONG_WAIT_S))
    await asyncio.sleep(0)  # started (it may or may not be waiting yet: both end)
    outbox.interrupt()
    assert await asyncio.wait_for(waiting, 5) == []
    at_hand = new_message("c1")
    await outbox.add(at_hand)
    outbox.interrupt()
    assert [e.message for e in await asyncio.wait_for(outbox.read(10, LONG_WAIT_S), 5)] == [at_hand]
    assert await asyncio.wait_for(outbox.read(10, LONG_WAIT_S), 5) == []  # that interrupt's
    outbox.interrupt()
    outbox.interrupt()  # two stopping writers: each call ends one wait
    assert await asyncio.wait_for(outbox.read(10, LONG_WAIT_S), 5) == []
    assert await asyncio.wait_for(outbox.read(10, LONG_WAIT_S), 5) == []
    later = new_message("c1")
    reader = asyncio.create_task(outbox.read(10, LONG_WAIT_S))
    writer = asyncio.create_task(outbox.add(later))
    assert [e.message for e in await asyncio.wait_for(reader, 5)] == [later]
    await writer


async def test_concurrent_readers_split_entries(
    outbox: Outbox, new_message: MessageFactory
) -> None:
    readers = [asyncio.create_task(outbox.read(10, LONG_WAIT_S)) for _ in range(2)]
    added = asyncio.create_task(outbox.add(new_message("c1")))
    done, pending = await asyncio.wait(readers, timeout=5, return_when=asyncio.FIRST_COMPLETED)
    await added
    assert len(done) == 1
    await outbox.add(new_message("c1"))
    more, _ = await asyncio.wait(pending, timeout=5)
    got = [e.message.offset for t in (*done, *more) for e in t.result()]
    assert sorted(got) == [1, 2]


async def test_entries_stay_pending_until_acked(
    outbox: Outbox, new_message: MessageFactory
) -> None:
    for _ in range(3):
        await outbox.add(new_message("c1"))
    assert await outbox.backlog() == 3
    handed = await outbox.read(2, 1.0)
    assert await outbox.backlog() == 3  # handed out is not done
    rest = await outbox.read(10, 1.0)
    assert [e.message.offset for e in rest] == [3]
    assert await outbox.read(10, 0.01) == []  # pending entries are not handed out again
    await outbox.ack([handed[0].entry_id])
    assert await outbox.backlog() == 2
    await outbox.ack([handed[0].entry_id, "unknown-id"])  # acking twice is harmless
    assert await outbox.backlog() == 2
    await outbox.ack([handed[1].entry_id, rest[0].entry_id])
    assert await outbox.backlog() == 0


async def test_bound_counts_queued_and_pending(
    make_outbox: MakeOutbox, new_message: MessageFactory
) -> None:
    outbox = await make_outbox(max_entries=3)
    for _ in range(3):
        await outbox.add(new_message("c1"))
    with pytest.raises(OutboxFull):
        await outbox.add(new_message("c1"))
    entries = await outbox.read(2, 1.0)
    with pytest.raises(OutboxFull):  # read but not acked still takes room
        await outbox.add(new_message("c1"))
    assert await outbox.backlog() == 3
    await outbox.ack([e.entry_id for e in entries])
    await outbox.add(new_message("c1"))
    await outbox.add(new_message("c1"))
    assert await outbox.backlog() == 3
    with pytest.raises(OutboxFull):
        await outbox.add(new_message("c1"))


async def test_ids_keep_increasing_after_acks(outbox: Outbox, new_message: MessageFactory) -> None:
    ids: list[str] = []
    for _ in range(3):
        await outbox.add(new_message("c1"))
        entries = await outbox.read(10, 1.0)
        await outbox.ack([e.entry_id for e in entries])
        ids.extend(e.entry_id for e in entries)
    assert ids == sorted(ids) and len(set(ids)) == 3
