"""Drains the outbox into the store in batches: exactly once in effect, never losing an entry.

A batch is acknowledged only after the store committed it, and a failed batch is retried as is
until it succeeds; since the store ignores rows it already has, a replay (a retry after a
commit whose answer was lost, or entries claimed from a dead instance) is harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from protocol.backoff import Backoff

from .outbox.base import Outbox
from .records import OutboxEntry
from .store.base import Store

log = logging.getLogger("storage.batch_writer")

T = TypeVar("T")
# Short but not zero: some outboxes read "block 0" as "block forever".
_DRAIN_WAIT_S = 0.01


class WriterLoad:
    """Whether an instance's first writer keeps up alone. Every batch costs a transaction and
    an outbox read and ack whatever its size, so a second writer that shares a light load
    only halves the batches (measured: ~1.6 ms of an instance's CPU a batch on Postgres).
    It stands by until the first one's batches are full or take its whole pacing interval,
    where the overlap of one writer's Python work with the other's database work pays."""

    def __init__(self) -> None:
        self.busy = False


class BatchWriter:
    def __init__(
        self,
        outbox: Outbox,
        store: Store,
        *,
        max_batch: int = 10_000,
        max_wait_ms: float = 1000,
        min_interval_ms: float = 0,
        backoff_initial_s: float = 0.05,
        backoff_max_s: float = 5.0,
        on_batch: Callable[[int, float], None] | None = None,
        on_error: Callable[[BaseException], None] | None = None,
        load: WriterLoad | None = None,
        standby: bool = False,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.outbox = outbox
        self.store = store
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000
        # Paced under load: each batch costs a transaction and an outbox read and ack, whatever
        # its size, and a batch read at once after the last one holds what came meanwhile.
        self.min_interval_s = min_interval_ms / 1000
        self.backoff = Backoff(backoff_initial_s, backoff_max_s)
        self._on_batch = on_batch
        self._on_error = on_error
        # The first writer reports to ``load``; a ``standby`` one reads only while it is busy.
        self._load = load
        self._standby = standby and load is not None
        self._task: asyncio.Task[None] | None = None
        self._draining = False
        self._finishing = False
        self.batches = 0
        self.written = 0  # messages the store reported as new
        self.errors = 0

    def backoff_delay(self, attempt: int) -> float:
        """Seconds to wait before retry number ``attempt`` (1, 2, ...): capped, jittered, so
        that many instances do not hammer a recovering database in step."""
        return self.backoff.delay(attempt)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        if self.running:
            return
        self._draining = False
        self._finishing = False
        self._task = asyncio.create_task(self.run(), name="storage.batch_writer")

    async def finish(self, timeout_s: float = 10) -> None:
        """Stop after the batch in hand is written (a shared outbox: others take the rest).

        Nothing read is left pending for another instance to claim later.
        """
        task = self._task
        if task is None:
            return
        self._task = None
        self._finishing = True
        self.outbox.interrupt()
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.shield(task)
        except TimeoutError:
            log.error("the batch in hand was not written within %.1fs", timeout_s)
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def stop(self, drain: bool = True, timeout_s: float = 10) -> None:
        """Stop the loop; when draining, first persist everything the outbox still holds."""
        task = self._task
        if task is None:
            if drain:
                # Never started (or already stopped): flush what is there all the same.
                task = asyncio.create_task(self._drain_only(), name="storage.batch_writer.drain")
            else:
                return
        self._task = None
        try:
            if drain:
                self._draining = True
                self.outbox.interrupt()
                try:
                    async with asyncio.timeout(timeout_s):
                        await asyncio.shield(task)
                except TimeoutError:
                    log.error(
                        "outbox not drained within %.1fs; %d entries left",
                        timeout_s,
                        await self._backlog(),
                    )
        finally:
            # Also when stop() itself is cancelled: never leave the loop running unowned.
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _drain_only(self) -> None:
        self._draining = True
        await self.run()

    async def run(self) -> None:
        """Write batches until cancelled, or, once draining, until the outbox is empty."""
        log.info("batch writer started (max_batch=%d)", self.max_batch)
        while not self._finishing:
            if self._standby and not await self._needed():
                continue
            wait_s = _DRAIN_WAIT_S if self._draining else self.max_wait_s
            # Idle, a read waits up to ``max_wait_s`` (a second by default: a wake-up a second,
            # where reading every 50 ms was most of an idle instance's CPU); an entry ends the
            # wait at once, and ``stop`` and ``finish`` end it (``Outbox.interrupt``).
            entries = await self._retry(
                "outbox read", functools.partial(self.outbox.read, self.max_batch, wait_s)
            )
            if not entries:
                if self._draining:
                    log.info("batch writer drained the outbox")
                    return
                continue
            started = asyncio.get_running_loop().time()
            await self._write(entries)
            if self._load is not None and not self._standby:
                took = asyncio.get_running_loop().time() - started
                self._load.busy = len(entries) >= self.max_batch or took >= self.min_interval_s
            if len(entries) < self.max_batch:
                await self._pace(started)

    async def _needed(self) -> bool:
        """A standby writer: whether to read now (else it waited a pacing interval)."""
        assert self._load is not None
        if self._load.busy or self._draining:
            return True
        await asyncio.sleep(self.min_interval_s or self.max_wait_s)
        return False

    async def _pace(self, started: float) -> None:
        """Until ``min_interval_s`` after the batch started; at once when stopping."""
        loop = asyncio.get_running_loop()
        while not (self._draining or self._finishing):
            rest = started + self.min_interval_s - loop.time()
            if rest <= 0:
                return
            await asyncio.sleep(min(rest, _DRAIN_WAIT_S))

    async def _write(self, entries: Sequence[OutboxEntry]) -> None:
        messages = [entry.message for entry in entries]
        started = time.perf_counter()
        new = await self._retry("batch write", lambda: self.store.write_messages(messages))
        elapsed = time.perf_counter() - started
        self.batches += 1
        self.written += new
        if new != len(messages):
            log.debug("batch of %d held %d already stored", len(messages), len(messages) - new)
        ids = [entry.entry_id for entry in entries]
        await self._retry("outbox ack", lambda: self.outbox.ack(ids))
        if self._on_batch is not None:
            try:
                self._on_batch(len(messages), elapsed)
            except Exception:
                log.exception("on_batch callback failed")

    async def _retry(self, what: str, op: Callable[[], Awaitable[T]]) -> T:
        attempt = 0
        while True:
            try:
                return await op()
            except Exception as exc:
                attempt += 1
                self.errors += 1
                delay = self.backoff_delay(attempt)
                log.warning(
                    "%s failed (attempt %d), retrying in %.3fs: %r", what, attempt, delay, exc
                )
                if self._on_error is not None:
                    try:
                        self._on_error(exc)
                    except Exception:
                        log.exception("on_error callback failed")
                await asyncio.sleep(delay)

    async def _backlog(self) -> int:
        try:
            return await self.outbox.backlog()
        except Exception:
            return -1
