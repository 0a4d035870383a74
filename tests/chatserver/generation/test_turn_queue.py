"""The questions waiting on an instance for their turn, oldest first."""

from __future__ import annotations

import asyncio
import random

import pytest

from chatserver.generation.turn_queue import TurnQueue


async def test_the_oldest_is_the_lowest_offset_still_waiting() -> None:
    queue = TurnQueue()
    offsets = list(range(1, 200))
    random.Random(7).shuffle(offsets)
    for offset in offsets:
        queue.add(offset)
    left = set(offsets)
    for offset in random.Random(8).sample(offsets, len(offsets)):
        assert queue.oldest() == min(left)
        queue.remove(offset)
        left.discard(offset)
    assert queue.oldest() is None
    assert len(queue) == 0


async def test_wake_oldest_sets_only_the_oldest() -> None:
    queue = TurnQueue()
    woken = {offset: queue.add(offset) for offset in (5, 3, 9)}
    queue.remove(3)
    queue.wake_oldest()
    assert [o for o, e in woken.items() if e.is_set()] == [5]
    queue.wake_all()
    assert [o for o, e in woken.items() if e.is_set()] == [5, 9]  # 3 left


async def test_leaving_out_of_order_keeps_its_order_bounded() -> None:
    queue = TurnQueue()
    queue.add(0)  # the oldest stays: those behind it leave before reaching the top
    for offset in range(1, 10_000):
        queue.add(offset)
        queue.remove(offset)
    assert queue.oldest() == 0
    assert len(queue._order) <= 2 * len(queue) + 16


async def test_a_parked_question_is_started_when_it_is_the_oldest_and_stays_the_oldest() -> None:
    queue = TurnQueue()
    first = queue.add(1)
    started: dict[int, asyncio.Event] = {}
    for offset in (3, 2):
        queue.park(offset, lambda woken, offset=offset: started.__setitem__(offset, woken))
    assert len(queue) == 3 and queue.oldest() == 1
    queue.wake_oldest()  # the oldest has its task: only woken
    assert first.is_set() and not started
    queue.remove(1)
    queue.wake_oldest()  # now a parked one: made, with a wake-up already set
    assert list(started) == [2] and started[2].is_set()
    assert queue.oldest() == 2  # it holds its place while its task starts
    queue.wake_all()  # shutting down: every parked one is made and woken
    assert list(started) == [2, 3] and started[3].is_set()


async def test_a_parked_question_that_fails_to_start_leaves_no_place_behind() -> None:
    queue = TurnQueue()

    def broken(woken: asyncio.Event) -> None:
        raise RuntimeError("no task")

    queue.park(1, broken)
    queue.park(2, lambda woken: None)
    with pytest.raises(RuntimeError):
        queue.wake_oldest()
    assert queue.oldest() == 2 and len(queue) == 1
