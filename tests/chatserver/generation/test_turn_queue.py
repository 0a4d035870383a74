"""The questions waiting on an instance for their turn, oldest first."""

from __future__ import annotations

import random

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
