"""Capped exponential backoff with jitter: the delays between retries, and nothing else.

Pure (no clock, no sleep): every retry loop of the server, the storage layer and the client
asks a :class:`Backoff` how long to wait and sleeps itself, so one schedule serves blocking
and asyncio code alike, and a test can read the schedule without waiting for it.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Backoff:
    """Retry ``n`` (1, 2, ...) waits at most ``min(max_s, initial_s * factor ** (n - 1))``.

    ``jitter`` is the part of that ceiling left to chance: the delay is drawn uniformly from
    ``[ceiling * (1 - jitter), ceiling]``. Jitter keeps many clients that failed together
    from retrying in step (a thundering herd on whatever just recovered); keeping the lower
    part still lets the delay grow. 0 gives the exact ceiling.
    """

    initial_s: float
    max_s: float
    factor: float = 2.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if not 0 < self.initial_s <= self.max_s:
            raise ValueError("backoff needs 0 < initial_s <= max_s")
        if self.factor < 1 or not 0 <= self.jitter <= 1:
            raise ValueError("backoff needs factor >= 1 and 0 <= jitter <= 1")

    def ceiling(self, attempt: int) -> float:
        """The longest wait before retry number ``attempt`` (1, 2, ...)."""
        # The exponent is bounded so that a loop retrying for days cannot overflow a float.
        return min(self.max_s, self.initial_s * self.factor ** min(max(attempt, 1) - 1, 64))

    def delay(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait before retry number ``attempt`` (1, 2, ...)."""
        ceiling = self.ceiling(attempt)
        return ceiling * (1 - self.jitter * rand())

    def delays(self, rand: Callable[[], float] = random.random) -> Iterator[float]:
        """The waits before retry 1, 2, ... for a loop that starts over on success."""
        attempt = 0
        while True:
            attempt += 1
            yield self.delay(attempt, rand)
