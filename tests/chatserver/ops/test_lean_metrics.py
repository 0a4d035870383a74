"""The lean per-frame metrics expose exactly what prometheus_client's own would."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import generate_latest

from chatserver.ops.lean_metrics import LeanCounter, LeanHistogram

_BUCKETS = (0.001, 0.005, 0.01, 1)
# On the bounds too: a bucket is "less than or equal".
_OBSERVED = (0.0, 0.0005, 0.001, 0.003, 0.005, 0.0051, 0.01, 0.5, 1, 2.5, 1e9)


def _exposed(registry: CollectorRegistry) -> list[str]:
    """The exposition's lines, without the creation times only prometheus_client keeps."""
    text = generate_latest(registry).decode()
    return [line for line in text.splitlines() if "_created" not in line]


def test_counters_and_histograms_read_the_same_as_prometheus_clients() -> None:
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    for registry, counter, histogram in (
        (theirs, Counter, Histogram),
        (ours, LeanCounter, LeanHistogram),
    ):
        frames = counter("t_frames", "Frames by type", ["type"], registry=registry)
        plain = counter("t_plain", "No labels", registry=registry)
        timed = histogram(
            "t_seconds", "Times by type", ["type"], buckets=_BUCKETS, registry=registry
        )
        delay = histogram("t_delay_seconds", "No labels", buckets=_BUCKETS, registry=registry)
        frames.labels("send").inc()
        frames.labels("send").inc(2)
        frames.labels("join").inc()
        plain.inc(5)
        for amount in _OBSERVED:
            timed.labels("send").observe(amount)
            delay.observe(amount)
        timed.labels("join").observe(0.002)
    assert _exposed(ours) == _exposed(theirs)
    assert ours.get_sample_value("t_seconds_bucket", {"type": "send", "le": "0.005"}) == 5
    assert ours.get_sample_value("t_frames_total", {"type": "send"}) == 3


def test_a_series_asked_with_the_wrong_labels_is_refused_as_prometheus_client_does() -> None:
    registry = CollectorRegistry()
    frames = LeanCounter("t_frames", "Frames by type", ["type"], registry=registry)
    timed = LeanHistogram("t_seconds", "Times", ["type"], buckets=_BUCKETS, registry=registry)
    plain = LeanCounter("t_plain", "No labels", registry=registry)
    with pytest.raises(ValueError, match="takes labels"):
        frames.labels("send", "extra")
    with pytest.raises(ValueError, match="takes labels"):
        timed.labels()
    with pytest.raises(ValueError, match="takes labels"):
        plain.labels()  # none to take: its one series is the family's
    with pytest.raises(ValueError, match="use labels"):
        frames.inc()  # not counted where no scrape would see it
    with pytest.raises(ValueError, match="use labels"):
        timed.observe(0.1)
