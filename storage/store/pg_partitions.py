"""Monthly partitions of ``messages``: create ahead, drop past the retention window.

Partitions are named ``messages_yYYYYmMM`` and hold ``[first of month, first of next month)``
in UTC. ``messages_default`` (created by migration 0001) catches rows outside every partition.
Creating a month whose rows already sit in the default partition moves them into the new
partition in the same transaction (Postgres refuses to add a partition that would leave
matching rows in the default one).

All maintenance runs under one transaction-level advisory lock, so only one instance at a
time does it, and it works through PgBouncer in transaction mode.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

log = logging.getLogger("storage.store.postgres")

PARTITION_LOCK = 0x63686174_0002
DEFAULT_PARTITION = "messages_default"
_NAME = re.compile(r"messages_y(\d{4})m(\d{2})")
_COLUMNS = (
    'conversation_id, "offset", created_at, id, role, text, text_raw, user_id, agent_id, '
    "client_msg_id, finish_reason, input_tokens, output_tokens, model, reply_to"
)


@dataclass(slots=True)
class PartitionReport:
    created: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    moved_from_default: int = 0
    deleted_from_default: int = 0
    skipped: bool = False  # another instance held the maintenance lock


def month_start(moment: date | datetime) -> date:
    if isinstance(moment, datetime):
        moment = moment.astimezone(UTC).date()
    return moment.replace(day=1)


def add_months(month: date, count: int) -> date:
    index = month.year * 12 + month.month - 1 + count
    return date(index // 12, index % 12 + 1, 1)


def partition_name(month: date) -> str:
    return f"messages_y{month.year:04d}m{month.month:02d}"


def partition_month(name: str) -> date | None:
    found = _NAME.fullmatch(name)
    if found is None:
        return None
    return date(int(found.group(1)), int(found.group(2)), 1)


def _bound(month: date) -> str:
    # A literal, not a parameter: DDL takes no parameters. Built from a date, never from input.
    return f"'{month.isoformat()} 00:00:00+00'"


def _utc(month: date) -> datetime:
    return datetime(month.year, month.month, 1, tzinfo=UTC)


async def list_partitions(conn: Any) -> list[str]:
    """The monthly partitions of ``messages`` (not the default one), oldest first."""
    rows = await conn.fetch(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = 'messages'::regclass"
    )
    names = [str(row[0]) for row in rows if partition_month(str(row[0])) is not None]
    return sorted(names)


async def _lock(conn: Any, wait: bool) -> bool:
    if wait:
        await conn.execute("SELECT pg_advisory_xact_lock($1)", PARTITION_LOCK)
        return True
    return bool(await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", PARTITION_LOCK))


async def _create_month(conn: Any, month: date) -> int:
    """Create one month's partition; returns how many rows it took over from the default."""
    name = partition_name(month)
    lo, hi = _utc(month), _utc(add_months(month, 1))
    bounds = f"FOR VALUES FROM ({_bound(month)}) TO ({_bound(add_months(month, 1))})"
    stray = await conn.fetchval(
        f"SELECT EXISTS (SELECT 1 FROM {DEFAULT_PARTITION} "
        "WHERE created_at >= $1 AND created_at < $2)",
        lo,
        hi,
    )
    if not stray:
        await conn.execute(f"CREATE TABLE {name} PARTITION OF messages {bounds}")
        return 0
    await conn.execute(f"CREATE TABLE {name} (LIKE messages INCLUDING ALL)")
    status = await conn.execute(
        f"WITH moved AS (DELETE FROM {DEFAULT_PARTITION} "
        f"WHERE created_at >= $1 AND created_at < $2 RETURNING {_COLUMNS}) "
        f"INSERT INTO {name} ({_COLUMNS}) SELECT {_COLUMNS} FROM moved",
        lo,
        hi,
    )
    await conn.execute(f"ALTER TABLE messages ATTACH PARTITION {name} {bounds}")
    return int(str(status).split()[-1])


async def ensure_partitions(
    conn: Any, months_ahead: int, *, now: datetime | None = None, wait: bool = True
) -> PartitionReport:
    """Make sure the current month and the next ``months_ahead`` have partitions.

    ``wait=False`` gives up at once (``skipped``) when another instance holds the lock: the
    hourly run uses it, since that instance is doing the same work.
    """
    report = PartitionReport()
    current = month_start(now or datetime.now(UTC))
    async with conn.transaction():
        if not await _lock(conn, wait):
            report.skipped = True
            return report
        existing = set(await list_partitions(conn))
        for ahead in range(months_ahead + 1):
            month = add_months(current, ahead)
            if partition_name(month) in existing:
                continue
            report.moved_from_default += await _create_month(conn, month)
            report.created.append(partition_name(month))
    if report.created:
        log.info(
            "created message partitions %s (%d rows moved from the default partition)",
            report.created,
            report.moved_from_default,
        )
    return report


async def drop_old_partitions(
    conn: Any, retain_months: int, *, now: datetime | None = None
) -> PartitionReport:
    """Detach and drop the partitions entirely older than ``retain_months`` full months.

    With ``retain_months=3`` in November, August, September and October are kept beside
    November, and July and older go. Rows of the default partition older than the window are
    deleted too, so the window holds whichever partition a row landed in.
    """
    if retain_months < 1:
        raise ValueError("retain_months must be at least 1")
    report = PartitionReport()
    cutoff = add_months(month_start(now or datetime.now(UTC)), -retain_months)
    async with conn.transaction():
        await _lock(conn, wait=True)
        for name in await list_partitions(conn):
            month = partition_month(name)
            if month is None or add_months(month, 1) > cutoff:
                continue
            await conn.execute(f"ALTER TABLE messages DETACH PARTITION {name}")
            await conn.execute(f"DROP TABLE {name}")
            report.dropped.append(name)
        status = await conn.execute(
            f"DELETE FROM {DEFAULT_PARTITION} WHERE created_at < $1", _utc(cutoff)
        )
        report.deleted_from_default = int(str(status).split()[-1])
    log.info(
        "retention of %d months: dropped partitions %s, %d old rows of the default partition",
        retain_months,
        report.dropped,
        report.deleted_from_default,
    )
    return report
