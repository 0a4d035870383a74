"""The SQL of the SQLite store: schema and synchronous operations run on its worker threads."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Sequence
from datetime import UTC
from typing import Any

from protocol import Message, parse_timestamp

from ..records import Conversation
from .base import StoreUnavailable
from .schema import (
    SQLITE_COLUMNS,
    SQLITE_NAMES,
    column_list,
    message_from_row,
    message_values,
    sqlite_values,
)

log = logging.getLogger("storage.store.sqlite")

SCHEMA_VERSION = 1

_MESSAGE_COLUMNS_DDL = ",\n    ".join(f"{c.quoted} {c.sqlite_type}" for c in SQLITE_COLUMNS)

# Timestamps are kept as the protocol's RFC 3339 strings: fixed width, UTC, milliseconds, so
# lexicographic order is time order and they round-trip byte for byte.
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY);
CREATE TABLE IF NOT EXISTS users (
    id TEXT PRIMARY KEY,
    tier TEXT NOT NULL,
    role TEXT NOT NULL,
    is_active INTEGER NOT NULL DEFAULT 1,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    agent_id TEXT NOT NULL,
    title TEXT NOT NULL,
    owner_id TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS conversations_by_updated ON conversations (updated_at DESC, id DESC);
CREATE INDEX IF NOT EXISTS conversations_by_owner ON conversations (owner_id);
CREATE TABLE IF NOT EXISTS conversation_members (
    conversation_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    PRIMARY KEY (conversation_id, user_id)
);
CREATE INDEX IF NOT EXISTS members_by_user ON conversation_members (user_id, conversation_id);
CREATE TABLE IF NOT EXISTS messages (
    {_MESSAGE_COLUMNS_DDL},
    UNIQUE (conversation_id, "offset")
);
CREATE INDEX IF NOT EXISTS messages_by_id ON messages (id);
CREATE INDEX IF NOT EXISTS messages_by_client_msg_id
    ON messages (conversation_id, user_id, client_msg_id) WHERE client_msg_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS usage (
    user_id TEXT NOT NULL,
    day TEXT NOT NULL,
    input_tokens INTEGER NOT NULL DEFAULT 0,
    output_tokens INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (user_id, day)
);
"""

MESSAGE_COLUMNS = column_list(SQLITE_COLUMNS)
_INSERT_MESSAGE = (
    f"INSERT OR IGNORE INTO messages ({MESSAGE_COLUMNS}) "
    f"VALUES ({', '.join('?' * len(SQLITE_COLUMNS))})"
)


def message_row(m: Message) -> tuple[Any, ...]:
    """The values of the SQLite columns (it keeps the text and the timestamp as they are)."""
    values: tuple[Any, ...] = sqlite_values(message_values(m, m.created_at, m.text, None))
    return values


def row_message(row: Sequence[Any]) -> Message:
    """The message of a row selected as ``MESSAGE_COLUMNS``."""
    named = dict(zip(SQLITE_NAMES, row, strict=True))
    return message_from_row(named, text=named["text"], created_at=named["created_at"])


def _usage_day(created_at: str) -> str:
    return parse_timestamp(created_at).astimezone(UTC).date().isoformat()


class transaction:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any error (the connection is in autocommit)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def __enter__(self) -> None:
        # IMMEDIATE takes the write lock up front, so busy_timeout applies here and not as a
        # deadlock-prone lock upgrade halfway through the batch.
        self._conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self._conn.execute("COMMIT")
        elif self._conn.in_transaction:
            self._conn.execute("ROLLBACK")


def select_one(conn: sqlite3.Connection) -> None:
    conn.execute("SELECT 1").fetchone()


def create_schema(conn: sqlite3.Connection) -> None:
    with transaction(conn):
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                conn.execute(statement)
        row = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
        if row[0] is None:
            conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
        elif row[0] > SCHEMA_VERSION:
            raise StoreUnavailable(
                f"database schema version {row[0]} is newer than this server's {SCHEMA_VERSION}"
            )


def load_members(conn: sqlite3.Connection, conversation_ids: Sequence[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {cid: [] for cid in conversation_ids}
    if not conversation_ids:
        return out
    marks = ",".join("?" * len(conversation_ids))
    # rowid order is insertion order, so members come back in the order they were given.
    for cid, user in conn.execute(
        "SELECT conversation_id, user_id FROM conversation_members "
        f"WHERE conversation_id IN ({marks}) ORDER BY rowid",
        list(conversation_ids),
    ):
        out[cid].append(user)
    return out


def row_conversation(row: Sequence[Any], members: list[str]) -> Conversation:
    return Conversation(
        id=row[0],
        agent_id=row[1],
        title=row[2],
        owner_id=row[3],
        members=tuple(members),
        created_at=row[4],
        updated_at=row[5],
    )


def write_batch(conn: sqlite3.Connection, batch: list[Message]) -> int:
    new: list[Message] = []
    newest: dict[str, str] = {}
    with transaction(conn):
        for m in batch:
            if conn.execute(_INSERT_MESSAGE, message_row(m)).rowcount == 1:
                new.append(m)
            if m.created_at > newest.get(m.conversation_id, ""):
                newest[m.conversation_id] = m.created_at
        conn.executemany(
            "UPDATE conversations SET updated_at = ? WHERE id = ? AND updated_at < ?",
            [(at, cid, at) for cid, at in newest.items()],
        )
        _add_usage(conn, batch, new)
    return len(new)


def _add_usage(conn: sqlite3.Connection, batch: list[Message], new: list[Message]) -> None:
    """Charge each new assistant reply to the user who wrote the message it answers."""
    authors = {m.id: m.user_id for m in batch}
    for m in new:
        if m.role != "assistant" or m.usage is None or m.reply_to is None:
            continue
        tokens = m.usage.input_tokens + m.usage.output_tokens
        if tokens == 0:
            continue
        user_id = authors.get(m.reply_to)
        if user_id is None:
            row = conn.execute(
                "SELECT user_id FROM messages WHERE id = ? AND conversation_id = ? LIMIT 1",
                (m.reply_to, m.conversation_id),
            ).fetchone()
            user_id = row[0] if row is not None else None
        if user_id is None:
            log.warning(
                "usage of message %s not charged: replied-to message %s has no known author",
                m.id,
                m.reply_to,
            )
            continue
        conn.execute(
            "INSERT INTO usage (user_id, day, input_tokens, output_tokens) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (user_id, day) DO UPDATE SET "
            "input_tokens = input_tokens + excluded.input_tokens, "
            "output_tokens = output_tokens + excluded.output_tokens",
            (user_id, _usage_day(m.created_at), m.usage.input_tokens, m.usage.output_tokens),
        )
