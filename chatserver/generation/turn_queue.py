"""The questions of one conversation waiting on an instance for their turn."""

from __future__ import annotations

import asyncio
import heapq
from collections.abc import Callable

# Starts a parked question's task, handing it the wake-up it waits on from then on.
Start = Callable[[asyncio.Event], None]


class TurnQueue:
    """Offset -> wake-up of each question waiting here, the oldest found in O(log n):
    behind a stalled reply a conversation can queue thousands, and each arrival asks
    whether it is the oldest.

    A question queued behind an older one waiting here may be *parked*: no task until it
    is the oldest, only what starts one. Only the oldest ever asks Redis, so the others'
    tasks would only sleep; a long queue then costs a heap entry a question, not a task,
    a wake-up and a timer."""

    def __init__(self) -> None:
        self._woken: dict[int, asyncio.Event] = {}
        self._parked: dict[int, Start] = {}
        self._order: list[int] = []  # a heap; offsets no longer waiting leave it lazily

    def add(self, offset: int) -> asyncio.Event:
        woken = self._woken[offset] = asyncio.Event()
        heapq.heappush(self._order, offset)
        return woken

    def park(self, offset: int, start: Start) -> None:
        self._parked[offset] = start
        heapq.heappush(self._order, offset)

    def remove(self, offset: int) -> None:
        del self._woken[offset]
        if len(self._order) > 2 * len(self) + 16:  # bounded by those waiting
            self._order = [*self._woken, *self._parked]
            heapq.heapify(self._order)

    def oldest(self) -> int | None:
        order = self._order
        while order and order[0] not in self._woken and order[0] not in self._parked:
            heapq.heappop(order)
        return order[0] if order else None

    def wake_oldest(self) -> None:
        oldest = self.oldest()
        if oldest is None:
            return
        woken = self._woken.get(oldest)
        if woken is None:
            woken = self._unpark(oldest)
        woken.set()

    def wake_all(self) -> None:
        for offset in list(self._parked):
            self._unpark(offset)
        for woken in self._woken.values():
            woken.set()

    def _unpark(self, offset: int) -> asyncio.Event:
        """Its task, waiting on a wake-up it holds from now on (no gap in which it is not
        the oldest)."""
        start = self._parked.pop(offset)
        woken = self._woken[offset] = asyncio.Event()
        try:
            start(woken)
        except BaseException:
            del self._woken[offset]  # no task waits on it: it must not stay the oldest
            raise
        return woken

    def __len__(self) -> int:
        return len(self._woken) + len(self._parked)
