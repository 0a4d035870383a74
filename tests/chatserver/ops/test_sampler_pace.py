"""The sampled gauges follow ``CHAT_METRICS_SAMPLE_S``."""

from __future__ import annotations

import time

from chatserver import keys
from tests.chatserver.conftest import MakeHarness, eventually

from .test_metrics import value

CHANGES = 10


async def test_the_sampler_runs_at_the_configured_pace(make_harness: MakeHarness) -> None:
    """The window's hit count reaches its counter only through the sampler: each hit is
    seen at the next round, so ten hits in turn take at least nine rounds, over nine seconds
    at the default pace, well under five at a twentieth of a second."""
    harness = await make_harness(metrics_sample_s=0.05)
    window, metrics = harness.app[keys.WINDOW], harness.app[keys.METRICS]
    started = time.monotonic()
    for n in range(1, CHANGES + 1):
        window.hits += 1  # as a read served from the window counts itself
        await eventually(lambda n=n: value(metrics, "chat_window_hits_total") == n, timeout=5)
    assert time.monotonic() - started < (CHANGES - 1) / 2
