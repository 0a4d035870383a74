"""Per-tier limits: messages per minute, connections per user, daily model tokens."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol

from protocol import ErrorCode
from protocol.record import record
from storage import AppendGate

# Tokens a user already used on a UTC day, read from the store when a counter starts.
UsageSeed = Callable[[str, str], Awaitable[int]]


@record
class Refusal:
    """Why a send may not go now, and in how many ms asking again makes sense."""

    code: ErrorCode  # RATE_LIMITED or QUOTA_EXCEEDED
    retry_after_ms: int

    @classmethod
    def rate(cls, wait_ms: int) -> Refusal:
        return cls(ErrorCode.RATE_LIMITED, wait_ms)

    @classmethod
    def quota(cls) -> Refusal:
        """The day's tokens are used up: until the next UTC day."""
        return cls(ErrorCode.QUOTA_EXCEEDED, ms_until_next_utc_day())


# What a tier's setting must name; the others keep their defaults when left out (settings
# written before they existed still parse).
_REQUIRED = frozenset({"messages_per_minute", "connections", "daily_tokens"})


@dataclass(frozen=True, slots=True)
class TierLimits:
    messages_per_minute: int
    connections: int
    daily_tokens: int
    requests_per_minute: int = 120  # authenticated REST requests
    conversations: int = 1000  # conversations a user owns at once
    conversations_per_minute: int = 10  # creations

    @classmethod
    def parse(cls, text: str, name: str) -> TierLimits:
        """``messages_per_minute=20,connections=5,daily_tokens=100000`` and, optionally,
        ``requests_per_minute=…,conversations=…,conversations_per_minute=…``."""
        known = set(cls.__dataclass_fields__)
        values: dict[str, int] = {}
        for part in text.split(","):
            key, _, raw = part.strip().partition("=")
            if key not in known:
                raise ValueError(f"{name}: unknown limit {key!r}")
            try:
                values[key] = int(raw)
            except ValueError:
                raise ValueError(f"{name}: {key} must be an integer, got {raw!r}") from None
            if values[key] < 1:
                raise ValueError(f"{name}: {key} must be positive")
        missing = _REQUIRED - set(values)
        if missing:
            raise ValueError(f"{name}: missing {', '.join(sorted(missing))}")
        return cls(**values)


_DAY_S = 86_400
# The current UTC day and its number since the epoch: every send and every reply asks,
# and building a datetime each time cost more than the rest of the in-memory check.
_today: tuple[int, str] = (-1, "")


def utc_day(now: datetime | None = None) -> str:
    global _today
    if now is not None:
        return now.date().isoformat()  # YYYY-MM-DD, without strftime
    number = int(time.time() // _DAY_S)  # Unix time counts no leap seconds: days are exact
    if number != _today[0]:
        _today = (number, datetime.fromtimestamp(number * _DAY_S, UTC).date().isoformat())
    return _today[1]


def ms_until_next_utc_day(now: datetime | None = None) -> int:
    now = now or datetime.now(UTC)
    tomorrow = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return max(1, int((tomorrow - now).total_seconds() * 1000))


class Limiter(Protocol):
    name: str

    async def open_connection(self, user_id: str, connection_id: str, limits: TierLimits) -> bool:
        """Count a new connection; False when the user already has their maximum."""

    async def close_connection(self, user_id: str, connection_id: str) -> None: ...

    async def renew_connections(self, connections: list[tuple[str, str]]) -> None:
        """Keep this instance's connections counted (an instance that dies stops renewing)."""

    async def add_tokens(self, user_id: str, tokens: int) -> None:
        """Count tokens the model really used for the user today."""

    async def take(self, user_id: str, kind: str, per_minute: int) -> Refusal | None:
        """One action of ``kind`` (``rest``, ``create``) from the user's bucket of that kind:
        ``per_minute`` at most, in bursts of as many. None to go ahead, else rate_limited."""

    async def check_send(self, user_id: str, limits: TierLimits) -> Refusal | None:
        """Quota, then rate, in one step: None to go ahead, else why not.

        A message refused for its quota takes no token from the rate bucket.
        """

    def send_gate(self, user_id: str, limits: TierLimits) -> AppendGate | None:
        """The same check as a gate for the window's append (one round trip for both), or
        None when this limiter has none (then ``check_send`` comes first)."""

    async def gate_refused(self, user_id: str, code: int, value: int) -> Refusal | None:
        """What a refusal by ``send_gate``'s gate means, or None
        when the gate could not decide yet (the day's counter is started now: append again)."""
