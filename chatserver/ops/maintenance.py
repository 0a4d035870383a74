"""Background upkeep of the store: the monthly message partitions of Postgres.

The store creates the partitions it needs at start-up; this keeps them ahead of the calendar
for servers that run for months. Every instance runs the loop; a transaction-level advisory
lock makes one of them do the work at a time (the others skip that round).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from aiohttp import web

from .. import keys

if TYPE_CHECKING:  # asyncpg is imported only when Postgres is used
    from storage.store.postgres import PostgresStore

log = logging.getLogger("chatserver.maintenance")

PARTITION_INTERVAL_S = 3600.0


async def ensure_partitions_forever(store: PostgresStore, interval_s: float) -> None:
    """Every ``interval_s``: create the partitions of this month and the next ones."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            report = await store.ensure_partitions(wait=False)
        except Exception as exc:  # the next round tries again; never kill the loop
            log.warning("partition maintenance failed: %r", exc)
            continue
        if report.skipped:
            log.debug("partition maintenance: another instance holds the lock")
        elif report.created:
            log.info("partition maintenance created %s", report.created)


async def partition_maintenance(app: web.Application) -> AsyncIterator[None]:
    """Cleanup context: the hourly partition upkeep, when the store is Postgres."""
    store = app[keys.STORE]
    task: asyncio.Task[None] | None = None
    if store.name == "postgres":
        from storage.store.postgres import PostgresStore

        assert isinstance(store, PostgresStore)
        task = asyncio.create_task(
            ensure_partitions_forever(store, PARTITION_INTERVAL_S),
            name="chatserver.partition_maintenance",
        )
    yield
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
