"""Versioned migrations: once each, in a transaction each, safe with many starters at once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg  # type: ignore[import-untyped]
import pytest

from chatserver.cli import main
from storage.store.pg_migrate import Migration, SchemaError, load_migrations, migrate
from storage.store.postgres import PostgresStore
from tests.services import PostgresServer


@pytest.fixture
async def conn(postgres_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    c = await asyncpg.connect(postgres_dsn)
    yield c
    await c.close()


async def _versions(conn: asyncpg.Connection) -> list[int]:
    return [r[0] for r in await conn.fetch("SELECT version FROM schema_migrations ORDER BY 1")]


def test_migration_files_are_numbered_and_shipped() -> None:
    found = load_migrations()
    assert found and found[0].version == 1
    assert [m.version for m in found] == sorted({m.version for m in found})
    assert "PARTITION BY RANGE (created_at)" in found[0].sql


async def test_three_concurrent_migrators_apply_each_migration_once(
    postgres_dsn: str, conn: asyncpg.Connection
) -> None:
    # Not idempotent on purpose: a second application would fail (table exists, or the row
    # count would double). The sleep keeps the first migrator inside its transaction while the
    # others arrive.
    steps = [
        Migration(1, "counter", "CREATE TABLE applied (n integer); SELECT pg_sleep(0.3)"),
        Migration(2, "count", "INSERT INTO applied VALUES (2); SELECT pg_sleep(0.1)"),
        Migration(3, "more", "ALTER TABLE applied ADD COLUMN extra text"),
    ]
    conns = [await asyncpg.connect(postgres_dsn) for _ in range(3)]
    try:
        results = await asyncio.gather(*(migrate(c, steps) for c in conns))
    finally:
        for c in conns:
            await c.close()
    # Every version was applied by exactly one of the three.
    assert sorted(v for applied in results for v in applied) == [1, 2, 3]
    assert await _versions(conn) == [1, 2, 3]
    assert await conn.fetchval("SELECT count(*) FROM applied") == 1
    # Running again is a no-op.
    assert await migrate(conn, steps) == []


async def test_concurrent_store_starts_migrate_once(postgres_dsn: str) -> None:
    stores = [PostgresStore(postgres_dsn, migrate=True, pool_min=1, pool_max=2) for _ in range(3)]
    await asyncio.gather(*(s.start() for s in stores))
    try:
        every = [m.version for m in load_migrations()]
        assert sorted(v for s in stores for v in s.applied_migrations) == every
        async with stores[0]._primary.acquire() as c:
            assert await _versions(c) == every
    finally:
        for s in stores:
            await s.close()


async def test_a_failing_migration_leaves_nothing_behind(conn: asyncpg.Connection) -> None:
    good = Migration(1, "good", "CREATE TABLE kept (n integer)")
    bad = Migration(2, "bad", "CREATE TABLE half_done (n integer); SELECT 1 / 0")
    with pytest.raises(asyncpg.DivisionByZeroError):
        await migrate(conn, [good, bad])
    assert await _versions(conn) == [1]
    assert await conn.fetchval("SELECT to_regclass('kept') IS NOT NULL")
    assert await conn.fetchval("SELECT to_regclass('half_done') IS NULL")


async def test_store_refuses_an_unmigrated_database_unless_told_to_migrate(
    postgres_dsn: str,
) -> None:
    store = PostgresStore(postgres_dsn, migrate=False, pool_min=1, pool_max=1)
    with pytest.raises(SchemaError, match="chatserver migrate"):
        await store.start()
    migrating = PostgresStore(postgres_dsn, migrate=True, pool_min=1, pool_max=1)
    await migrating.start()
    await migrating.close()
    await store.start()  # now it is migrated
    await store.ping()
    await store.close()


@pytest.fixture
def quiet_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process CLI runs must not replace the test process's log handlers."""
    monkeypatch.setattr("chatserver.cli.logs.configure", lambda level, instance: None)


@pytest.mark.usefixtures("quiet_cli")
def test_cli_migrate_then_partitions(
    postgres_dsn: str, postgres_server: PostgresServer, capsys: pytest.CaptureFixture[str]
) -> None:
    database = postgres_dsn.rsplit("/", 1)[1]
    # Without the schema the partitions command says what to do.
    assert main(["partitions", "--database-url", postgres_dsn]) == 1
    assert "chatserver migrate" in capsys.readouterr().err
    assert main(["migrate", "--database-url", postgres_dsn]) == 0
    assert "migrations applied: [1" in capsys.readouterr().out
    assert main(["migrate", "--database-url", postgres_dsn]) == 0
    assert "up to date" in capsys.readouterr().out
    versions = postgres_server.psql("SELECT count(*) FROM schema_migrations", database)
    assert int(versions) == len(load_migrations())
    assert main(["partitions", "--database-url", postgres_dsn, "--retain-months", "0"]) == 2
    assert main(["partitions", "--database-url", postgres_dsn, "--retain-months", "6"]) == 0
    assert "retention 6 months: dropped []" in capsys.readouterr().out


@pytest.mark.usefixtures("quiet_cli")
def test_cli_needs_a_database_url(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("CHAT_DATABASE_URL", raising=False)
    assert main(["migrate"]) == 2
    assert "--database-url" in capsys.readouterr().err
