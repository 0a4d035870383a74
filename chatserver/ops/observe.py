"""Periodic gauges: what no request path observes by itself.

A cleanup context (``observe``) runs two tasks for the app's lifetime:

- a sampler, every ``metrics_sample_s`` (a second by default): the outbox backlog, the reply
  jobs, the hot window's hit and miss counts (fed into counters as deltas), the database
  pools' size / in use / max, active users, how full each bounded in-process structure is
  (``chat_bounded_size``/``_limit``);
- a lag monitor: a timer that asks to wake every ``LAG_INTERVAL_S`` and records how late it
  actually woke (``chat_event_loop_lag_seconds``): anything blocking the loop shows there.

Database pools: ``Store.pool_stats()`` returns ``{"primary": (size, in_use, max), "replica":
(...)}``; SQLite has no pool and reports none.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from .. import keys
from .metrics import Metrics

log = logging.getLogger("chatserver.observe")

LAG_INTERVAL_S = 0.25
_BACKLOG_TIMEOUT_S = 2.0


class Sampler:
    """Reads the app's parts and sets the gauges; ``sample()`` is one round."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.metrics: Metrics = app[keys.METRICS]
        self._hits = 0
        self._misses = 0
        self._pools: set[str] = set()
        self._backlog_failing = False
        self._delivered = 0

    async def sample(self) -> None:
        self.sample_sync()
        await self._sample_backlog()
        await self._sample_jobs()

    async def _sample_jobs(self) -> None:
        generation = self.app.get(keys.GENERATION)
        jobs = generation.jobs if generation is not None else None
        if jobs is None:
            return
        self.metrics.reply_jobs_held.set(len(generation.held) if generation else 0)
        try:
            async with asyncio.timeout(_BACKLOG_TIMEOUT_S):  # not wait_for: see _sample_backlog
                stats = await jobs.stats()
        except Exception as exc:  # Redis away: the gauges keep their last value
            log.debug("reply job stats unavailable: %r", exc)
            return
        self.metrics.reply_jobs_outstanding.set(stats.outstanding)
        self.metrics.reply_jobs_oldest_age.set(stats.oldest_age_s)

    def sample_sync(self) -> None:
        metrics = self.metrics
        window = self.app[keys.WINDOW]
        hits, misses = window.hits, window.misses
        # A window that resets its counts starts a new series of deltas, never a negative one.
        metrics.window_hits.inc(max(0, hits - self._hits))
        metrics.window_misses.inc(max(0, misses - self._misses))
        self._hits, self._misses = hits, misses
        pools = self.app[keys.STORE].pool_stats()
        for name, (size, in_use, most) in pools.items():
            metrics.db_pool_size.labels(name).set(size)
            metrics.db_pool_in_use.labels(name).set(in_use)
            metrics.db_pool_max.labels(name).set(most)
        for gone in self._pools - set(pools):  # a pool closed: its series end
            for gauge in (metrics.db_pool_size, metrics.db_pool_in_use, metrics.db_pool_max):
                with contextlib.suppress(KeyError):
                    gauge.remove(gone)
        self._pools = set(pools)
        metrics.active_users.set(len(self.app[keys.STATE].users))
        hub = self.app.get(keys.HUB)
        if hub is not None:
            metrics.deliveries.inc(max(0, hub.delivered - self._delivered))
            self._delivered = hub.delivered
        generation = self.app.get(keys.GENERATION)
        if generation is not None:
            metrics.replies_queued.set(max(0, generation.pending - generation.running))
        for name, (size, limit) in self.app[keys.BOUNDED].fill().items():
            metrics.child(metrics.bounded_size, name).set(size)
            metrics.child(metrics.bounded_limit, name).set(limit)

    async def _sample_backlog(self) -> None:
        try:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancel that
            # lands as its awaitable finishes, and the sampler then outlives the shutdown that
            # cancelled it (the app's cleanup waits for it forever)
            outbox = self.app[keys.OUTBOX]
            started = time.perf_counter()
            async with asyncio.timeout(_BACKLOG_TIMEOUT_S):
                backlog = await outbox.backlog()
        except Exception as exc:
            # The gauge keeps its last value; the dependency's own checks report the outage.
            if not self._backlog_failing:
                log.warning("outbox backlog unavailable: %r", exc)
            self._backlog_failing = True
            if self.app[keys.OUTBOX].shared:
                self.metrics.redis_up.set(0)
            return
        if outbox.shared:  # the read was a Redis round trip: Redis' health, as seen from here
            self.metrics.redis_latency.observe(time.perf_counter() - started)
            broker = self.app.get(keys.BROKER)
            self.metrics.redis_up.set(1 if broker is None or broker.healthy() else 0)
        if self._backlog_failing:
            log.info("outbox backlog readable again")
        self._backlog_failing = False
        self.metrics.outbox_backlog.set(backlog)


async def sample_forever(sampler: Sampler, interval_s: float) -> None:
    while True:
        try:
            await sampler.sample()
        except Exception:
            log.exception("sampling metrics failed")
        await asyncio.sleep(interval_s)


async def watch_loop_lag(metrics: Metrics, interval_s: float = LAG_INTERVAL_S) -> None:
    """Observe how late a timer of ``interval_s`` fires, forever."""
    loop = asyncio.get_running_loop()
    while True:
        asked = loop.time()
        await asyncio.sleep(interval_s)
        metrics.loop_lag.observe(max(0.0, loop.time() - asked - interval_s))


async def observe(app: web.Application) -> AsyncIterator[None]:
    """Cleanup context: the sampler and the lag monitor, for the app's lifetime."""
    sampler = Sampler(app)
    tasks: list[asyncio.Task[Any]] = [
        asyncio.create_task(
            sample_forever(sampler, app[keys.SETTINGS].server.metrics_sample_s),
            name="metrics-sampler",
        ),
        asyncio.create_task(watch_loop_lag(app[keys.METRICS]), name="loop-lag"),
    ]
    yield
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
