"""The columns of a stored message, defined once for both stores.

Each store reads and writes message rows through this module: the Postgres batch writer builds
its rows with :func:`message_values` and names its columns from :data:`MESSAGE_COLUMNS`; the
SQLite store keeps the columns that have a SQLite type (it can hold any text, so it needs no
``text_raw``) and creates its table from them. Reading a row back is :func:`message_from_row`
for both. A column added here therefore reaches every statement; only the Postgres migration,
which is history, is written out by hand (a test compares it with this list).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

from protocol import Message, Usage


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    pg_type: str
    sqlite_type: str | None  # None: the column exists in Postgres only

    @property
    def quoted(self) -> str:
        return f'"{self.name}"'  # "offset" is a reserved word in both dialects


# In the order of the Postgres table and of the tuples of :func:`message_values`: the primary
# key (conversation_id, offset, created_at) first, so a row sorts by it as a tuple prefix.
MESSAGE_COLUMNS: tuple[Column, ...] = (
    Column("conversation_id", "text", "TEXT NOT NULL"),
    Column("offset", "bigint", "INTEGER NOT NULL"),
    Column("created_at", "timestamptz", "TEXT NOT NULL"),
    Column("id", "text", "TEXT NOT NULL"),
    Column("role", "text", "TEXT NOT NULL"),
    Column("text", "text", "TEXT NOT NULL"),
    # Postgres text holds neither NUL nor lone surrogates: the exact text is kept here as bytes.
    Column("text_raw", "bytea", None),
    Column("user_id", "text", "TEXT"),
    Column("agent_id", "text", "TEXT"),
    Column("client_msg_id", "text", "TEXT"),
    Column("finish_reason", "text", "TEXT"),
    Column("input_tokens", "integer", "INTEGER"),
    Column("output_tokens", "integer", "INTEGER"),
    Column("model", "text", "TEXT"),
    Column("reply_to", "text", "TEXT"),
)
NAMES: tuple[str, ...] = tuple(c.name for c in MESSAGE_COLUMNS)
INDEX: Mapping[str, int] = {name: i for i, name in enumerate(NAMES)}
PRIMARY_KEY = ("conversation_id", "offset", "created_at")

SQLITE_COLUMNS: tuple[Column, ...] = tuple(c for c in MESSAGE_COLUMNS if c.sqlite_type)
SQLITE_NAMES: tuple[str, ...] = tuple(c.name for c in SQLITE_COLUMNS)
# The SQLite row from a full row (the values of the columns SQLite has, in their order).
sqlite_values = itemgetter(*(INDEX[name] for name in SQLITE_NAMES))


def column_list(columns: tuple[Column, ...] = MESSAGE_COLUMNS, prefix: str = "") -> str:
    """``"conversation_id", "offset", ...``: for SELECT and INSERT lists."""
    return ", ".join(prefix + c.quoted for c in columns)


def unanswered_sql(columns: tuple[Column, ...], since: str, limit: str) -> str:
    """``Store.unanswered``: user messages created at or after ``since`` that no stored
    message answers (``reply_to``), by conversation and offset, at most ``limit``; both are
    SQL in the store's dialect (its placeholders, its clock)."""
    return (
        f"SELECT {column_list(columns, 'q.')} FROM messages q WHERE q.role = 'user' "
        f"AND q.created_at >= {since} AND NOT EXISTS (SELECT 1 FROM messages a "
        "WHERE a.conversation_id = q.conversation_id AND a.reply_to = q.id) "
        f'ORDER BY q.conversation_id, q."offset" LIMIT {limit}'
    )


def message_values(
    m: Message, created_at: Any, text: str, text_raw: bytes | None
) -> tuple[Any, ...]:
    """A message as one value per column of :data:`MESSAGE_COLUMNS`, in that order.

    The store passes its own forms of the fields it stores differently (Postgres: a datetime,
    the readable text beside the exact bytes; SQLite: the RFC 3339 string, the text itself).
    """
    usage = m.usage
    return (
        m.conversation_id,
        m.offset,
        created_at,
        m.id,
        m.role,
        text,
        text_raw,
        m.user_id,
        m.agent_id,
        m.client_msg_id,
        m.finish_reason,
        usage.input_tokens if usage is not None else None,
        usage.output_tokens if usage is not None else None,
        m.model,
        m.reply_to,
    )


def message_from_row(row: Any, *, text: str, created_at: str) -> Message:
    """The message of a row read by column name (an asyncpg Record, or a dict).

    ``text`` and ``created_at`` come from the caller, which knows how its store keeps them.
    """
    inp = row["input_tokens"]
    return Message(
        id=row["id"],
        conversation_id=row["conversation_id"],
        offset=int(row["offset"]),
        role=row["role"],
        text=text,
        created_at=created_at,
        user_id=row["user_id"],
        agent_id=row["agent_id"],
        client_msg_id=row["client_msg_id"],
        finish_reason=row["finish_reason"],
        usage=Usage(int(inp), int(row["output_tokens"])) if inp is not None else None,
        model=row["model"],
        reply_to=row["reply_to"],
    )
