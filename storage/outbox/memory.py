"""The embedded outbox: a bounded in-process queue, drained by the batch writer."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence

from protocol import Message

from ..records import OutboxEntry
from .base import OutboxFull

# Zero-padded so that string order is arrival order, like Redis stream ids compare.
_ID_WIDTH = 20


class MemoryOutbox:
    name = "memory"
    shared = False

    def __init__(self, max_entries: int = 100_000) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self._queued: deque[OutboxEntry] = deque()
        self._pending: dict[str, OutboxEntry] = {}
        self._seq = 0
        # Set whenever something is queued; readers clear it before waiting, so a wake-up is
        # never missed and nobody polls.
        self._ready = asyncio.Event()
        self._interrupts = 0  # waits to end (``interrupt``): one each

    async def start(self) -> None:
        pass

    def fill(self) -> dict[str, tuple[int, int]]:
        """Entries (queued and handed out, not yet acked) and bound, for the gauges."""
        return {"outbox_entries": (len(self._queued) + len(self._pending), self.max_entries)}

    async def close(self) -> None:
        # Entries are kept, and readers keep their normal timeout rather than returning at
        # once: the batch writer may still drain after the gateway closed, and an instant
        # empty answer would turn its read loop into a busy loop.
        pass

    async def add(self, message: Message) -> None:
        # No await in here: the window relies on add() not suspending to stay atomic.
        if len(self._queued) + len(self._pending) >= self.max_entries:
            raise OutboxFull(f"outbox holds {self.max_entries} entries")
        self._seq += 1
        self._queued.append(OutboxEntry(entry_id=f"{self._seq:0{_ID_WIDTH}d}", message=message))
        self._ready.set()

    async def read(self, max_count: int, max_wait_s: float) -> list[OutboxEntry]:
        if max_count < 1:
            return []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, max_wait_s)
        # Several readers may wake for one entry; the losers go back to waiting.
        while not self._queued:
            remaining = deadline - loop.time()
            if self._interrupts or remaining <= 0:  # an ending wait takes one interrupt
                self._interrupts = max(0, self._interrupts - 1)
                return []
            self._ready.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._ready.wait()
            except TimeoutError:
                return []
        count = min(max_count, len(self._queued))
        out: list[OutboxEntry] = []
        for _ in range(count):
            entry = self._queued.popleft()
            self._pending[entry.entry_id] = entry
            out.append(entry)
        return out

    def interrupt(self) -> None:
        self._interrupts += 1
        self._ready.set()

    async def ack(self, entry_ids: Sequence[str]) -> None:
        for entry_id in entry_ids:
            self._pending.pop(entry_id, None)

    async def backlog(self) -> int:
        return len(self._queued) + len(self._pending)

    async def requeue_pending(self) -> int:
        """Hand out again what was read but never acked (a writer died mid-batch).

        The Redis outbox gets the same effect by claiming idle pending entries.
        """
        entries = sorted(self._pending.values(), key=lambda e: e.entry_id, reverse=True)
        self._pending.clear()
        self._queued.extendleft(entries)
        if entries:
            self._ready.set()
        return len(entries)
