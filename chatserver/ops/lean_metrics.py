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

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString


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


class _Lean(Collector):
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
        registry.register(self)

    def describe(self) -> list[Metric]:
        return [self._family()]

    def _family(self) -> Metric:
        raise NotImplementedError


class LeanCounter(_Lean):
    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        registry: CollectorRegistry,
    ) -> None:
        self._children: dict[tuple[str, ...], CounterValue] = {}
        self._plain = CounterValue()
        super().__init__(name, documentation, labelnames, registry)

    def labels(self, *values: str) -> CounterValue:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}")
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = CounterValue()
        return child

    def inc(self, amount: float = 1) -> None:
        self._plain.value += amount

    def _family(self) -> CounterMetricFamily:
        if self.labelnames:
            return CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        return CounterMetricFamily(self.name, self.documentation)

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        if not self.labelnames:
            family.add_metric([], self._plain.value)
        for values, child in list(self._children.items()):
            family.add_metric(list(values), child.value)
        yield family


class LeanHistogram(_Lean):
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
        self._children: dict[tuple[str, ...], HistogramValue] = {}
        self._plain = HistogramValue(self._bounds)
        super().__init__(name, documentation, labelnames, registry)

    def labels(self, *values: str) -> HistogramValue:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}")
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = HistogramValue(self._bounds)
        return child

    def observe(self, amount: float) -> None:
        self._plain.observe(amount)

    def _family(self) -> HistogramMetricFamily:
        if self.labelnames:
            return HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        return HistogramMetricFamily(self.name, self.documentation)

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        children = list(self._children.items())
        if not self.labelnames:
            children = [((), self._plain)]
        for values, child in children:
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
