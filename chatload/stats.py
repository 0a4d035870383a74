"""Latency histograms that merge across worker processes, and their summaries.

Log-linear buckets over microseconds: exact below 2,048 µs, then 1,024 buckets per power of
two (values are reported as their bucket's lower bound: at most 0.1 % low). Recording is one
list increment; a histogram travels between processes as a sparse ``{bucket: count}`` map.
"""

from __future__ import annotations

import math

_LINEAR = 2048
_SUB = 1024
_SIZE = _LINEAR + 44 * _SUB  # up to 2**54 µs


def bucket_of(us: int) -> int:
    if us < _LINEAR:
        return us if us > 0 else 0
    shift = us.bit_length() - 11
    index = _LINEAR + (shift - 1) * _SUB + (us >> shift) - _SUB
    return index if index < _SIZE else _SIZE - 1


def value_of(index: int) -> int:
    """The lowest value (µs) that lands in bucket ``index``."""
    if index < _LINEAR:
        return index
    shift = (index - _LINEAR) // _SUB + 1
    return ((index - _LINEAR) % _SUB + _SUB) << shift


class Histogram:
    """Counts per bucket only: recording is one list increment (the receive path even bumps
    ``counts[us]`` itself below 2,048 µs). Count, mean and max are read from the buckets."""

    __slots__ = ("counts",)

    def __init__(self) -> None:
        self.counts = [0] * _SIZE

    def record_ns(self, ns: int) -> None:
        self.record_us(ns // 1000)

    def record_us(self, us: int) -> None:
        self.counts[bucket_of(us)] += 1

    @property
    def count(self) -> int:
        return sum(self.counts)

    def to_wire(self) -> dict[str, int]:
        return {str(i): c for i, c in enumerate(self.counts) if c}

    def merge_wire(self, wire: dict[str, int]) -> None:
        for index, count in wire.items():
            self.counts[int(index)] += int(count)

    def percentile_us(self, fraction: float) -> int:
        """The bucket value at or below which at least ``fraction`` of the samples lie."""
        total = self.count
        if not total:
            return 0
        rank = max(1, math.ceil(fraction * total))
        seen = 0
        for index, count in enumerate(self.counts):
            if count:
                seen += count
                if seen >= rank:
                    return value_of(index)
        return 0  # pragma: no cover - rank <= total

    def max_us(self) -> int:
        for index in range(_SIZE - 1, -1, -1):
            if self.counts[index]:
                return value_of(index)
        return 0

    def summary(self, offset_ms: float = 0.0) -> dict[str, float | int]:
        """count, mean, p50, p95, p99, max in ms; ``offset_ms`` is subtracted (e.g. a pace)."""
        total = self.count
        if not total:
            return {"count": 0, "mean": 0.0, "p50": 0.0, "p95": 0.0, "p99": 0.0, "max": 0.0}

        def ms(us: float) -> float:
            return round(us / 1000 - offset_ms, 3)

        mean = sum(value_of(i) * c for i, c in enumerate(self.counts) if c) / total
        return {
            "count": total,
            "mean": ms(mean),
            "p50": ms(self.percentile_us(0.50)),
            "p95": ms(self.percentile_us(0.95)),
            "p99": ms(self.percentile_us(0.99)),
            "max": ms(self.max_us()),
        }


HISTOGRAMS = ("connect", "join", "rest", "ack", "delivery", "ttft", "gap")
