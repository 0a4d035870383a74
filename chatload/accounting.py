"""Delivery accounting: what each receiver saw, and what was lost, duplicated or reordered.

Every message the harness sends carries a marker ``~L<32 hex digits>`` at the start of its
text: the sending client and that sender's sequence number (1, 2, 3 ...) as one 64-bit key
``sender << 32 | seq``, then the send time (``time.monotonic_ns()``, one clock for every
process of the machine). The sender's conversation is ``sender // members``. Each receiving
connection keeps, per sender, the highest sequence seen and the numbers it skipped:

- the next number, or a higher one (the skipped ones are remembered): a fresh delivery;
- a lower number that was skipped before: a fresh delivery, counted as *reordered*;
- a lower number that was not skipped: a *duplicate* (not counted as delivered).

*Lost* is settled at the end per conversation: every acknowledged message must reach every
member that was joined, so ``acked * members - fresh deliveries`` (never below zero). Deltas
of a reply are checked the same way on their ``seq`` per generation.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

FRESH = 0
REORDERED = 1
DUPLICATE = 2


class Receiver:
    """What one connection has seen: the highest sequence per stream, and the gaps."""

    __slots__ = ("last", "missing")

    def __init__(self) -> None:
        self.last: dict[int, int] = {}
        self.missing: set[int] = set()


class Tally:
    """Delivery counts of one worker (or of a test), by logical conversation."""

    def __init__(self) -> None:
        self.delivered: Counter[int] = Counter()
        self.delivered_total = 0
        self.duplicated = 0
        self.reordered = 0
        self.gaps = 0  # numbers skipped when seen (most arrive later or were rejected)

    def see(self, receiver: Receiver, conv: int, sender: int, seq: int) -> int:
        """Account one delivery of ``sender``'s message ``seq`` in ``conv`` to ``receiver``."""
        last = receiver.last.get(sender, 0)
        if seq > last:
            receiver.last[sender] = seq
            if seq != last + 1:
                missing = receiver.missing
                for skipped in range(last + 1, seq):
                    missing.add((sender << 32) | skipped)
                self.gaps += seq - last - 1
            self.delivered[conv] += 1
            self.delivered_total += 1
            return FRESH
        key = (sender << 32) | seq
        if key in receiver.missing:
            receiver.missing.discard(key)
            self.reordered += 1
            self.delivered[conv] += 1
            self.delivered_total += 1
            return REORDERED
        self.duplicated += 1
        return DUPLICATE

    def lost(self, acked: Mapping[int, int], members: Mapping[int, int]) -> tuple[int, int]:
        """(expected deliveries, lost deliveries) given acked messages and local members."""
        expected = lost = 0
        for conv, count in acked.items():
            want = count * members.get(conv, 0)
            expected += want
            lost += max(0, want - self.delivered.get(conv, 0))
        return expected, lost


def marker(sender: int, seq: int, t_ns: int) -> str:
    """32 hex digits: the key ``sender << 32 | seq``, then the send time; fixed width, so the
    receive path slices it out of the raw frame without splitting or decoding anything."""
    return f"{(sender << 32) | seq:016x}{t_ns:016x}"


def unmark(tag: str) -> tuple[int, int, int] | None:
    """(sender, seq, t_ns) of a marker (as sent in ``client_msg_id`` and ``ref``), else None."""
    if len(tag) != 32:
        return None
    try:
        key, sent = int(tag[:16], 16), int(tag[16:], 16)
    except ValueError:
        return None
    return key >> 32, key & 0xFFFFFFFF, sent


def parse_marker(payload: bytes) -> tuple[int, int, int] | None:
    """(sender, seq, t_ns) from a raw frame carrying a marker, else None."""
    start = payload.find(b"~L")
    if start < 0:
        return None
    return unmark(payload[start + 2 : start + 34].decode("ascii", "replace"))
