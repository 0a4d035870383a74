"""The model guard of one instance, in process memory (embedded mode)."""

from __future__ import annotations

import collections
import itertools
import time

from .model_guard import (
    BUSY_POLL_MS,
    WINDOW_MS,
    Busy,
    ModelLimitTable,
    Permit,
    model_id,
)


class MemoryModelGuard:
    name = "memory"

    def __init__(self, limits: ModelLimitTable) -> None:
        self.limits = limits
        self._inflight: dict[str, set[str]] = {}
        self._started: dict[str, collections.deque[float]] = {}  # start times, ms
        self._ids = itertools.count()

    async def acquire(self, model: str) -> Permit | Busy:
        key = model_id(model)
        limits = self.limits.of(key)
        held = self._inflight.setdefault(key, set())
        if limits.concurrent > 0 and len(held) >= limits.concurrent:
            return Busy("concurrent", limits.concurrent, BUSY_POLL_MS)
        if limits.per_minute > 0:
            now = time.monotonic() * 1000
            started = self._started.setdefault(key, collections.deque())
            while started and started[0] <= now - WINDOW_MS:
                started.popleft()
            if len(started) >= limits.per_minute:
                wait = started[0] + WINDOW_MS - now
                return Busy("per_minute", limits.per_minute, max(1, int(wait) + 1))
            started.append(now)
        permit = Permit(key, str(next(self._ids)), limits.concurrent > 0)
        if permit.concurrent:
            held.add(permit.token)
        return permit

    def release(self, permit: Permit) -> None:
        if permit.concurrent:
            self._inflight.get(permit.model, set()).discard(permit.token)

    async def close(self) -> None:
        self._inflight.clear()
