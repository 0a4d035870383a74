"""What only the SQLite store has: its file, its schema, its threads and its lock."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from storage import SqliteStore, StoreUnavailable
from storage.store.sqlite_ops import SCHEMA_VERSION

if TYPE_CHECKING:
    from conftest import MessageFactory


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "chat.db"


@pytest.fixture
async def sqlite_store(db_path: Path) -> AsyncIterator[SqliteStore]:
    store = SqliteStore(str(db_path), busy_timeout_ms=100)
    await store.start()
    yield store
    await store.close()


@pytest.fixture
def raw(db_path: Path) -> Iterator[sqlite3.Connection]:
    """A second, plain connection to the same file, as another process would have."""
    conn = sqlite3.connect(str(db_path), isolation_level=None)
    yield conn
    if conn.in_transaction:
        conn.execute("ROLLBACK")
    conn.close()


async def test_schema_is_created_with_its_version(
    sqlite_store: SqliteStore, raw: sqlite3.Connection
) -> None:
    tables = {row[0] for row in raw.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {
        "schema_version",
        "users",
        "conversations",
        "conversation_members",
        "messages",
        "usage",
    } <= tables
    assert raw.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_starting_twice_on_one_file_keeps_one_version_row(
    sqlite_store: SqliteStore, db_path: Path, raw: sqlite3.Connection
) -> None:
    again = SqliteStore(str(db_path))
    await again.start()
    await again.close()
    assert raw.execute("SELECT COUNT(*) FROM schema_version").fetchone()[0] == 1


async def test_ensure_user_never_downgrades(
    sqlite_store: SqliteStore, raw: sqlite3.Connection
) -> None:
    await sqlite_store.ensure_user("u1", "pro", "admin")
    await sqlite_store.ensure_user("u1", "free", "user")
    row = raw.execute("SELECT tier, role, is_active FROM users WHERE id = 'u1'").fetchone()
    assert row == ("pro", "admin", 1)


async def test_a_newer_schema_is_refused(db_path: Path) -> None:
    store = SqliteStore(str(db_path))
    await store.start()
    await store.close()
    with sqlite3.connect(str(db_path)) as conn:
        conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION + 1,))
    with pytest.raises(StoreUnavailable, match="newer"):
        await SqliteStore(str(db_path)).start()


async def test_an_unopenable_file_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(StoreUnavailable):
        await SqliteStore(str(tmp_path / "missing-dir" / "chat.db")).start()


async def test_a_closed_store_is_unavailable(sqlite_store: SqliteStore) -> None:
    await sqlite_store.close()
    with pytest.raises(StoreUnavailable):
        await sqlite_store.ping()
    with pytest.raises(StoreUnavailable):
        await sqlite_store.max_offset("c1")


async def test_in_memory_database_shares_one_connection(new_message: MessageFactory) -> None:
    store = SqliteStore(":memory:")
    await store.start()
    try:
        assert await store.write_messages([new_message("c1")]) == 1
        assert await store.max_offset("c1") == 1
    finally:
        await store.close()


async def test_a_locked_database_does_not_block_the_event_loop(
    db_path: Path, raw: sqlite3.Connection, new_message: MessageFactory
) -> None:
    # A slow disk or another writer must stall only the store's thread, never the loop.
    store = SqliteStore(str(db_path), busy_timeout_ms=30_000)
    await store.start()
    try:
        raw.execute("BEGIN IMMEDIATE")
        write = asyncio.create_task(store.write_messages([new_message("c1")]))
        loop_ran = asyncio.Event()
        asyncio.get_running_loop().call_soon(loop_ran.set)
        await asyncio.wait_for(loop_ran.wait(), 1)
        assert not write.done()  # had it run on the loop, it would have finished (or failed)
        raw.execute("COMMIT")
        assert await asyncio.wait_for(write, 10) == 1
    finally:
        await store.close()


async def test_a_lock_held_past_busy_timeout_is_unavailable(
    sqlite_store: SqliteStore, raw: sqlite3.Connection, new_message: MessageFactory
) -> None:
    message = new_message("c1")
    raw.execute("BEGIN IMMEDIATE")
    with pytest.raises(StoreUnavailable):
        await asyncio.wait_for(sqlite_store.write_messages([message]), 5)
    raw.execute("COMMIT")
    # Nothing half-written: the retry stores it once.
    assert await sqlite_store.write_messages([message]) == 1
    assert await sqlite_store.max_offset("c1") == 1
