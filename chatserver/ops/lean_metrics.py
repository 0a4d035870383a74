"""Counters and histograms for the per-frame paths: plain numbers, read when scraped.

prometheus_client's ``inc`` and ``observe`` check the metric and take a lock on every call
(0.6-0.9 µs here), and a message passes about eight of them on its way in and out. These
keep an int, or a bucket count list and a float sum, per label set, and hand the registry
the same families (names, help, labels, buckets) when it collects. The event loop is the
only writer; a scrape on another thread reads a value a moment old, never a torn one (the
GIL guards each number).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence
from typing import Generic, TypeVar

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

V = TypeVar("V", "CounterValue", "HistogramValue")


class CounterValue:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        self.value += amount


class HistogramValue:
    __slots__ = ("_bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum = 0.0

    def observe(self, amount: float) -> None:
        # The first bound not below it: buckets are "less than or equal" (le), +Inf last.
        self.counts[bisect_left(self._bounds, amount)] += 1
        self.sum += amount


class _Lean(Collector, Generic[V]):
    """A metric family registered as a collector; its children by label values."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        registry: CollectorRegistry,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], V] = {}
        # The one series of a family without labels; one with labels has only children.
        self._plain: V | None = None if self.labelnames else self._new()
        registry.register(self)

    def labels(self, *values: str) -> V:
        if not self.labelnames or len(values) != len(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}")
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._new()
        return child

    def describe(self) -> list[Metric]:
        return list(self.collect())  # the registry checks the names once, at registration

    def _series(self) -> list[tuple[tuple[str, ...], V]]:
        if self._plain is not None:
            return [((), self._plain)]
        return list(self._children.items())

    def _unlabelled(self) -> V:
        """The series of a family without labels (one with them is counted per child)."""
        if self._plain is None:
            raise ValueError(f"{self.name} has labels {self.labelnames}: use labels()")
        return self._plain

    def _new(self) -> V:
        raise NotImplementedError

    def collect(self) -> Iterator[Metric]:
        raise NotImplementedError


class LeanCounter(_Lean[CounterValue]):
    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        registry: CollectorRegistry,
    ) -> None:
        super().__init__(name, documentation, labelnames, registry)

    def inc(self, amount: float = 1) -> None:
        self._unlabelled().value += amount

    def _new(self) -> CounterValue:
        return CounterValue()

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, child in self._series():
            family.add_metric(list(values), child.value)
        yield family


class LeanHistogram(_Lean[HistogramValue]):
    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        self._bounds = (*sorted(float(b) for b in buckets), float("inf"))
        super().__init__(name, documentation, labelnames, registry)

    def observe(self, amount: float) -> None:
        self._unlabelled().observe(amount)

    def _new(self) -> HistogramValue:
        return HistogramValue(self._bounds)

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, child in self._series():
            counts, total = list(child.counts), child.sum
            cumulative, buckets = 0, []
            for bound, count in zip(self._bounds, counts, strict=True):
                cumulative += count
                buckets.append((_le(bound), cumulative))
            family.add_metric(list(values), buckets, total)
        yield family


def _le(bound: float) -> str:
    """A bucket's bound as prometheus_client spells it (``0.005``, ``1.0``, ``+Inf``)."""
    spelled: str = floatToGoString(bound)  # type: ignore[no-untyped-call]
    return spelled
