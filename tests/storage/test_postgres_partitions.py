"""Monthly partitions of messages: placement, the default partition, retention, pruning."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]
import pytest
from aiohttp import web

from chatserver import keys
from chatserver.ops import maintenance
from protocol import Message, format_timestamp
from storage import SqliteStore
from storage.store.pg_partitions import (
    PARTITION_LOCK,
    add_months,
    drop_old_partitions,
    ensure_partitions,
    list_partitions,
    month_start,
    partition_name,
)
from storage.store.postgres import PostgresStore

THIS_MONTH = month_start(datetime.now(UTC))


def at(month_offset: int, day: int = 15) -> str:
    """A timestamp in the month ``month_offset`` months from this one."""
    month = add_months(THIS_MONTH, month_offset)
    return format_timestamp(datetime(month.year, month.month, day, 12, 0, tzinfo=UTC))


def message(created_at: str, conversation_id: str = "c1", offset: int = 1) -> Message:
    return Message(
        id=str(uuid.uuid4()),
        conversation_id=conversation_id,
        offset=offset,
        role="user",
        text="hi",
        created_at=created_at,
        user_id="u1",
    )


@pytest.fixture
async def store(postgres_dsn: str) -> AsyncIterator[PostgresStore]:
    s = PostgresStore(postgres_dsn, migrate=True, pool_min=1, pool_max=4, months_ahead=3)
    await s.start()
    yield s
    await s.close()


@pytest.fixture
async def conn(store: PostgresStore, postgres_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    c = await asyncpg.connect(postgres_dsn)
    yield c
    await c.close()


async def where(conn: asyncpg.Connection, m: Message) -> str:
    """The partition a stored message landed in."""
    return str(
        await conn.fetchval(
            "SELECT tableoid::regclass::text FROM messages WHERE conversation_id = $1 AND id = $2",
            m.conversation_id,
            m.id,
        )
    )


async def test_start_creates_this_month_and_the_next_three(conn: asyncpg.Connection) -> None:
    expected = [partition_name(add_months(THIS_MONTH, i)) for i in range(4)]
    assert await list_partitions(conn) == expected
    assert await conn.fetchval("SELECT to_regclass('messages_default') IS NOT NULL")


async def test_rows_land_in_their_months_partition_or_the_default(
    store: PostgresStore, conn: asyncpg.Connection
) -> None:
    now = message(format_timestamp(datetime.now(UTC)), offset=1)
    next_month = message(at(1, day=1), offset=2)
    last_ahead = message(at(3, day=28), offset=3)
    long_ago = message("2020-01-05T10:00:00.000Z", offset=4)
    far_future = message(at(40), offset=5)
    assert await store.write_messages([now, next_month, last_ahead, long_ago, far_future]) == 5
    assert await where(conn, now) == partition_name(THIS_MONTH)
    assert await where(conn, next_month) == partition_name(add_months(THIS_MONTH, 1))
    assert await where(conn, last_ahead) == partition_name(add_months(THIS_MONTH, 3))
    assert await where(conn, long_ago) == "messages_default"
    assert await where(conn, far_future) == "messages_default"
    page = await store.messages_before("c1", None, 10)
    assert [m.id for m in page.messages] == [
        m.id for m in (now, next_month, last_ahead, long_ago, far_future)
    ]


async def test_a_new_partition_takes_over_its_rows_from_the_default(
    store: PostgresStore, conn: asyncpg.Connection
) -> None:
    early = message(at(6), offset=1)
    assert await store.write_messages([early]) == 1
    assert await where(conn, early) == "messages_default"
    report = await ensure_partitions(conn, 6)
    assert report.created == [partition_name(add_months(THIS_MONTH, i)) for i in (4, 5, 6)]
    assert report.moved_from_default == 1
    assert await where(conn, early) == partition_name(add_months(THIS_MONTH, 6))
    assert await conn.fetchval("SELECT count(*) FROM messages_default") == 0
    # Still one copy, still found, and a replay still conflicts in its new home.
    assert (await store.messages_before("c1", None, 10)).messages == (early,)
    assert await store.write_messages([early]) == 0


async def test_retention_drops_partitions_entirely_older_than_the_window(
    store: PostgresStore, conn: asyncpg.Connection
) -> None:
    for months_back in (-8, -4, -3):
        month = add_months(THIS_MONTH, months_back)
        await ensure_partitions(conn, 0, now=datetime(month.year, month.month, 2, tzinfo=UTC))
    old = message(at(-8), offset=1)
    kept_edge = message(at(-3), offset=2)
    stray_old = message("2015-06-01T00:00:00.000Z", offset=3)
    current = message(at(0), offset=4)
    await store.write_messages([old, message(at(-4), offset=5), kept_edge, stray_old, current])

    report = await drop_old_partitions(conn, retain_months=3)
    # Three full months before this one are kept: -3, -2, -1 (and this one, and ahead).
    assert report.dropped == [partition_name(add_months(THIS_MONTH, m)) for m in (-8, -4)]
    assert report.deleted_from_default == 1
    for months_back in (-8, -4):
        name = partition_name(add_months(THIS_MONTH, months_back))
        assert await conn.fetchval("SELECT to_regclass($1) IS NULL", name)
    remaining = (await store.messages_before("c1", None, 10)).messages
    assert [m.id for m in remaining] == [kept_edge.id, current.id]
    # Nothing left to drop the second time.
    assert (await store.drop_old_partitions(3)).dropped == []
    with pytest.raises(ValueError):
        await drop_old_partitions(conn, retain_months=0)


async def test_a_date_bounded_history_query_reads_one_partition(
    store: PostgresStore, conn: asyncpg.Connection
) -> None:
    await store.write_messages([message(at(m), offset=i) for i, m in enumerate((-1, 0, 1, 2), 1)])
    month = add_months(THIS_MONTH, 1)
    lo = datetime(month.year, month.month, 1, tzinfo=UTC)
    hi = datetime(add_months(month, 1).year, add_months(month, 1).month, 1, tzinfo=UTC)
    plan = "\n".join(
        row[0]
        for row in await conn.fetch(
            "EXPLAIN SELECT * FROM messages WHERE conversation_id = 'c1' "
            f"AND created_at >= '{lo.isoformat()}' AND created_at < '{hi.isoformat()}' "
            "ORDER BY created_at DESC LIMIT 50"
        )
    )
    others = [p for p in await list_partitions(conn) if p != partition_name(month)]
    assert partition_name(month) in plan
    assert not any(p in plan for p in [*others, "messages_default"]), plan
    # A generic plan of a prepared statement (parameters unknown when planning) prunes at
    # run time instead: the other partitions are removed before execution.
    await conn.execute("SET plan_cache_mode = force_generic_plan")
    await conn.execute(
        "PREPARE history(text, timestamptz, timestamptz) AS SELECT * FROM messages "
        "WHERE conversation_id = $1 AND created_at >= $2 AND created_at < $3 "
        "ORDER BY created_at DESC LIMIT 50"
    )
    rows = await conn.fetch(
        "EXPLAIN (ANALYZE, COSTS OFF) "
        f"EXECUTE history('c1', '{lo.isoformat()}', '{hi.isoformat()}')"
    )
    analyzed = "\n".join(row[0] for row in rows)
    assert "Subplans Removed: 4" in analyzed, analyzed  # 3 other months + the default
    assert partition_name(month) in analyzed
    assert not any(p in analyzed for p in [*others, "messages_default"]), analyzed


async def test_maintenance_skips_while_another_instance_holds_the_lock(
    store: PostgresStore, postgres_dsn: str
) -> None:
    other = await asyncpg.connect(postgres_dsn)
    try:
        async with other.transaction():
            await other.execute("SELECT pg_advisory_xact_lock($1)", PARTITION_LOCK)
            assert (await store.ensure_partitions(wait=False)).skipped
        report = await store.ensure_partitions(wait=False)
        assert not report.skipped and report.created == []
    finally:
        await other.close()


async def test_the_hourly_job_recreates_a_missing_partition(
    store: PostgresStore, conn: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(maintenance, "PARTITION_INTERVAL_S", 0.05)
    last = partition_name(add_months(THIS_MONTH, 3))
    await conn.execute(f"ALTER TABLE messages DETACH PARTITION {last}")
    await conn.execute(f"DROP TABLE {last}")
    app = web.Application()
    app[keys.STORE] = store
    job = maintenance.partition_maintenance(app)
    await job.__anext__()
    try:
        deadline = time.monotonic() + 10
        while last not in await list_partitions(conn):
            assert time.monotonic() < deadline, "the maintenance job did not recreate it"
            await asyncio.sleep(0.05)
    finally:
        with contextlib.suppress(StopAsyncIteration):
            await job.__anext__()


async def test_no_partition_job_on_sqlite(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "chat.db"))
    app = web.Application()
    app[keys.STORE] = store
    before = set(asyncio.all_tasks())
    job = maintenance.partition_maintenance(app)
    await job.__anext__()
    assert not [t for t in asyncio.all_tasks() - before if "partition" in t.get_name()]
    with contextlib.suppress(StopAsyncIteration):
        await job.__anext__()


def test_month_arithmetic() -> None:
    assert add_months(THIS_MONTH.replace(year=2026, month=11), 2).isoformat() == "2027-01-01"
    assert add_months(THIS_MONTH.replace(year=2026, month=1), -1).isoformat() == "2025-12-01"
    assert month_start(datetime(2026, 3, 31, 23, 59, tzinfo=UTC)).isoformat() == "2026-03-01"
    # Month boundaries are UTC: 00:30 on the 1st in UTC+1 is still the previous month.
    plus_one = datetime(2026, 4, 1, 0, 30, tzinfo=timezone(timedelta(hours=1)))
    assert month_start(plus_one).isoformat() == "2026-03-01"
