"""The guard on requests to the model: at most so many at once and so many a minute, per model.

Google limits a key's requests per minute per model (and answers 429 past it); a burst of
users asking at once would otherwise send every one of them, have most refused, and retry
them all into the same wall. The guard is asked before every request to the model (every
retry too: each one counts against Google's quota) and answers a :class:`Permit`, or
:class:`Busy` with how long to wait. Shared through Redis by every instance
(``RedisModelGuard``), in process memory in embedded mode (``MemoryModelGuard``).

- *Concurrent*: requests in flight at once; a permit holds its place until released (a
  dead instance's places expire after the lease, ``LEASE_S``, as the holder renews them).
- *Per minute*: requests started within any 60 s (a sliding window of their start times,
  so a minute never holds more, not even across the edge of a clock minute).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from protocol.record import record

LEASE_S = 30.0  # a permit's place, renewed every third of it while its request runs
WINDOW_MS = 60_000
BUSY_POLL_MS = 250  # a concurrency refusal cannot know when a place frees: ask again then


@dataclass(frozen=True, slots=True)
class ModelLimits:
    concurrent: int = 0  # 0: no cap
    per_minute: int = 0  # 0: no cap

    @property
    def unlimited(self) -> bool:
        return self.concurrent <= 0 and self.per_minute <= 0


class ModelLimitTable:
    """The limits of each model: a default, and overrides by model id.

    Written ``MODEL=CONCURRENT/PER_MINUTE`` separated by commas
    (``gemini-2.5-pro=20/150,gemini-2.5-flash=100/1000``); 0 means no cap.
    """

    def __init__(self, default: ModelLimits, overrides: dict[str, ModelLimits] | None = None):
        self.default = default
        self._overrides = {model_id(k): v for k, v in (overrides or {}).items()}

    def of(self, model: str) -> ModelLimits:
        return self._overrides.get(model_id(model), self.default)

    @classmethod
    def parse(cls, text: str, default: ModelLimits) -> ModelLimitTable:
        overrides: dict[str, ModelLimits] = {}
        for part in text.split(","):
            part = part.strip()
            if not part:
                continue
            model, sep, limits = part.partition("=")
            concurrent, slash, per_minute = limits.partition("/")
            try:
                if not (sep and slash and model.strip()):
                    raise ValueError
                parsed = ModelLimits(int(concurrent), int(per_minute))
            except ValueError:
                raise ValueError(f"expected MODEL=CONCURRENT/PER_MINUTE, got {part!r}") from None
            if parsed.concurrent < 0 or parsed.per_minute < 0:
                raise ValueError(f"limits must not be negative, got {part!r}")
            overrides[model.strip()] = parsed
        return cls(default, overrides)


def model_id(model: str) -> str:
    """One name per model: ``models/gemini-2.5-flash`` is ``gemini-2.5-flash``."""
    return model.removeprefix("models/")


@record
class Permit:
    """Leave to send one request; release it when the request is over."""

    model: str  # the model id
    token: str  # unique: the permit's place among the model's requests in flight
    concurrent: bool  # it holds a place (the model has a concurrency cap)


@record
class Busy:
    """No request now: ``limit`` (``concurrent`` or ``per_minute``, whose cap is ``cap``) is
    reached; asking again in ``retry_after_ms`` may succeed."""

    limit: str
    cap: int
    retry_after_ms: int


class ModelGuard(Protocol):
    name: str

    async def acquire(self, model: str) -> Permit | Busy:
        """A permit for one request to ``model`` now, or when to ask again. Never waits."""

    def release(self, permit: Permit) -> None:
        """The request is over: its place is free (at once, or soon: never blocks)."""

    async def close(self) -> None:
        """Release what is held and stop renewing."""
