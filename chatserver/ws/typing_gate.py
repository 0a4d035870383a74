"""Typing notices coalesced per user and conversation, per instance.

A client may send ``typing`` on every keystroke; each notice fans out to every member's
connections. At most one per ``interval`` passes for a (user, conversation); the others are
dropped quietly (a notice is a hint, so a dropped one is not an error). The counts are per
instance: a user connected to two instances may pass one notice on each.
"""

from __future__ import annotations

import time


class TypingGate:
    __slots__ = ("_interval", "_last")

    def __init__(self, interval_ms: int) -> None:
        self._interval = interval_ms / 1000
        # Insertion order is time order (an entry is moved to the end when it passes again),
        # so the expired ones are at the front: pruned as we go, the dict holds only the pairs
        # that passed within the last interval.
        self._last: dict[tuple[str, str], float] = {}

    def allow(self, user_id: str, conversation_id: str) -> bool:
        if self._interval <= 0:
            return True
        now = time.monotonic()
        last = self._last
        while last:
            oldest_key = next(iter(last))
            if now - last[oldest_key] < self._interval:
                break
            del last[oldest_key]
        key = (user_id, conversation_id)
        if key in last:
            return False
        last[key] = now
        return True
