"""The questions of one conversation waiting on an instance for their turn."""

from __future__ import annotations

import asyncio
import heapq


class TurnQueue:
    """Offset -> wake-up of each question waiting here, the oldest found in O(log n):
    behind a stalled reply a conversation can queue thousands, and each arrival asks
    whether it is the oldest."""

    def __init__(self) -> None:
        self._woken: dict[int, asyncio.Event] = {}
        self._order: list[int] = []  # a heap; offsets no longer waiting leave it lazily

    def add(self, offset: int) -> asyncio.Event:
        woken = self._woken[offset] = asyncio.Event()
        heapq.heappush(self._order, offset)
        return woken

    def remove(self, offset: int) -> None:
        del self._woken[offset]
        if len(self._order) > 2 * len(self._woken) + 16:  # bounded by those waiting
            self._order = list(self._woken)
            heapq.heapify(self._order)

    def oldest(self) -> int | None:
        order = self._order
        while order and order[0] not in self._woken:
            heapq.heappop(order)
        return order[0] if order else None

    def wake_oldest(self) -> None:
        oldest = self.oldest()
        if oldest is not None:
            self._woken[oldest].set()

    def wake_all(self) -> None:
        for woken in self._woken.values():
            woken.set()

    def __len__(self) -> int:
        return len(self._woken)
