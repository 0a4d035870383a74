"""The one definition of the message columns (``storage.store.schema``) against both stores."""

from __future__ import annotations

import dataclasses
import sqlite3
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]

from protocol import Message, Usage
from storage import SqliteStore
from storage.store.pg_write import ROW_TYPE, STAGE_COLUMNS
from storage.store.postgres import PostgresStore
from storage.store.schema import (
    MESSAGE_COLUMNS,
    NAMES,
    PRIMARY_KEY,
    SQLITE_NAMES,
    message_from_row,
    message_values,
)

# Every field set, and no two fields alike: a value in the wrong column cannot go unseen.
FULL = Message(
    id="m-id",
    conversation_id="c-id",
    offset=7,
    role="assistant",
    text="the text",
    created_at="2026-11-18T10:00:00.123Z",
    user_id="u-id",
    agent_id="a-id",
    client_msg_id="k-id",
    finish_reason="stop",
    usage=Usage(11, 13),
    model="m-1",
    reply_to="r-id",
)


def test_every_message_field_has_a_column_and_round_trips() -> None:
    values = message_values(FULL, FULL.created_at, FULL.text, None)
    assert len(values) == len(MESSAGE_COLUMNS)
    row = dict(zip(NAMES, values, strict=True))
    back = message_from_row(row, text=row["text"], created_at=row["created_at"])
    assert back == FULL
    # usage is kept as its two counts, text also as exact bytes (Postgres): all else by name.
    stored_as = {"usage": {"input_tokens", "output_tokens"}}
    for f in dataclasses.fields(Message):
        assert stored_as.get(f.name, {f.name}) <= set(NAMES), f.name


def test_rows_sort_by_the_primary_key() -> None:
    assert NAMES[: len(PRIMARY_KEY)] == PRIMARY_KEY


async def _migrated_attributes(dsn: str, relation: str) -> list[tuple[str, str]]:
    """(name, type) of the attributes of ``relation`` (a table, or a composite type's
    relation), in order, after the store migrated the database."""
    store = PostgresStore(dsn, migrate=True, pool_min=1)
    await store.start()
    await store.close()
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT attname, format_type(atttypid, atttypmod) AS type FROM pg_attribute "
            "WHERE attrelid = $1::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            relation,
        )
    finally:
        await conn.close()
    pg_names = {"timestamp with time zone": "timestamptz"}
    return [(r["attname"], pg_names.get(r["type"], r["type"])) for r in rows]


async def test_postgres_migration_matches_the_columns(postgres_dsn: str) -> None:
    got = await _migrated_attributes(postgres_dsn, "messages")
    assert got == [(c.name, c.pg_type) for c in MESSAGE_COLUMNS]


async def test_postgres_batch_row_type_matches_the_staged_columns(postgres_dsn: str) -> None:
    """A small batch is sent as one array of this type: its attributes are a staged row's."""
    assert await _migrated_attributes(postgres_dsn, ROW_TYPE) == list(STAGE_COLUMNS)


async def test_sqlite_table_matches_the_columns(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "chat.db"))
    await store.start()
    await store.close()
    with sqlite3.connect(tmp_path / "chat.db") as conn:
        names = [row[1] for row in conn.execute("PRAGMA table_info(messages)")]
    assert names == list(SQLITE_NAMES)
