"""Limits of one instance, in process memory."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Mapping

from protocol import ErrorCode
from storage import AppendGate

from .base import Refusal, TierLimits, UsageSeed, ms_until_next_utc_day, utc_day


class MemoryLimiter:
    name = "memory"

    def __init__(self, seed: UsageSeed, max_users: int = 10_000) -> None:
        self._seed = seed
        # Buckets (per user and kind) and day counters kept, each table apart; the least
        # recently used go first: a forgotten bucket starts full, a forgotten count is read
        # from the store again.
        self.max_users = max_users
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, at
        # A user's one connection as its id; a set from the second on (most users have one).
        self._connections: dict[str, str | set[str]] = {}
        self._used: OrderedDict[tuple[str, str], int] = OrderedDict()

    async def _take_message(self, user_id: str, limits: TierLimits) -> int | None:
        return self._take_from(user_id, limits.messages_per_minute)

    def _take_from(self, key: str, per_minute: int) -> int | None:
        """A token from bucket ``key`` (refilled continuously): None, or ms to wait."""
        capacity = float(per_minute)
        rate = capacity / 60.0  # tokens per second
        now = time.monotonic()
        tokens, at = self._buckets.pop(key, (capacity, now))
        tokens = min(capacity, tokens + (now - at) * rate)
        if tokens >= 1:
            self._remember(self._buckets, key, (tokens - 1, now))
            return None
        self._remember(self._buckets, key, (tokens, now))
        return max(1, int((1 - tokens) / rate * 1000))

    async def take(self, user_id: str, kind: str, per_minute: int) -> Refusal | None:
        wait_ms = self._take_from(f"{kind}\x00{user_id}", per_minute)
        return Refusal.rate(wait_ms) if wait_ms is not None else None

    async def open_connection(self, user_id: str, connection_id: str, limits: TierLimits) -> bool:
        held = self._connections.get(user_id)
        if held is None or held == connection_id:
            if limits.connections < 1:
                return False
            self._connections[user_id] = connection_id
            return True
        if isinstance(held, str):
            held = {held}
        if connection_id not in held and len(held) >= limits.connections:
            return False
        held.add(connection_id)
        self._connections[user_id] = held
        return True

    async def close_connection(self, user_id: str, connection_id: str) -> None:
        held = self._connections.get(user_id)
        if held is None:
            return
        if isinstance(held, str):
            if held == connection_id:
                del self._connections[user_id]
            return
        held.discard(connection_id)
        if len(held) == 1:
            self._connections[user_id] = next(iter(held))
        elif not held:
            del self._connections[user_id]

    async def renew_connections(self, connections: list[tuple[str, str]]) -> None:
        return None

    async def _today(self, user_id: str) -> tuple[tuple[str, str], int]:
        key = (user_id, utc_day())
        used = self._used.get(key)
        if used is None:
            used = await self._seed(user_id, key[1])
            used = max(used, self._used.get(key, 0))  # a count may have landed meanwhile
        self._remember(self._used, key, used)
        return key, used

    async def _quota_retry_ms(self, user_id: str, limits: TierLimits) -> int | None:
        _, used = await self._today(user_id)
        return ms_until_next_utc_day() if used >= limits.daily_tokens else None

    async def check_send(self, user_id: str, limits: TierLimits) -> Refusal | None:
        reset_ms = await self._quota_retry_ms(user_id, limits)
        if reset_ms is not None:
            return Refusal(ErrorCode.QUOTA_EXCEEDED, reset_ms)
        wait_ms = await self._take_message(user_id, limits)
        return Refusal.rate(wait_ms) if wait_ms is not None else None

    def send_gate(self, user_id: str, limits: TierLimits) -> AppendGate | None:
        return None  # in-process: check_send is as cheap

    async def gate_refused(self, user_id: str, code: int, value: int) -> Refusal | None:
        raise TypeError("the memory limiter makes no gates")

    async def add_tokens(self, user_id: str, tokens: int) -> None:
        key, used = await self._today(user_id)
        self._used[key] = used + tokens

    def fill(self) -> Mapping[str, tuple[int, int]]:
        """Entries and bound of each table, for the gauges (``chatserver.ops.memory``)."""
        return {
            "limiter_buckets": (len(self._buckets), self.max_users),
            "limiter_day_counts": (len(self._used), self.max_users),
        }

    def _remember(self, table: OrderedDict, key: object, value: object) -> None:  # type: ignore[type-arg]
        table[key] = value
        table.move_to_end(key)
        while len(table) > self.max_users:
            table.popitem(last=False)
