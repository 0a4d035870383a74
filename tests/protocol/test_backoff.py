"""protocol.backoff: the one retry schedule of every retry loop."""

from __future__ import annotations

import itertools

import pytest

from protocol.backoff import Backoff


def test_the_ceiling_doubles_up_to_the_cap() -> None:
    b = Backoff(initial_s=0.05, max_s=1.0)
    assert [b.ceiling(n) for n in range(1, 7)] == [0.05, 0.1, 0.2, 0.4, 0.8, 1.0]
    assert b.ceiling(10**9) == 1.0  # days of retries: no overflow


def test_jitter_spans_the_top_of_the_ceiling() -> None:
    b = Backoff(initial_s=1.0, max_s=8.0, jitter=0.25)
    assert b.delay(3, rand=lambda: 0.0) == 4.0
    assert b.delay(3, rand=lambda: 1.0) == 3.0
    exact = Backoff(initial_s=1.0, max_s=8.0, jitter=0.0)
    assert exact.delay(2) == 2.0


def test_delays_count_the_attempts() -> None:
    b = Backoff(initial_s=1.0, max_s=3.0, factor=3.0, jitter=0.0)
    assert list(itertools.islice(b.delays(), 4)) == [1.0, 3.0, 3.0, 3.0]


@pytest.mark.parametrize(
    "args",
    [(0.0, 1.0), (2.0, 1.0), (0.1, 1.0, 0.5), (0.1, 1.0, 2.0, 1.5), (0.1, 1.0, 2.0, -0.1)],
)
def test_nonsense_is_refused(args: tuple[float, ...]) -> None:
    with pytest.raises(ValueError):
        Backoff(*args)
