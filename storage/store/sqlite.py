"""The embedded store: one SQLite file, used from worker threads so the event loop never blocks."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, TypeVar

from protocol import Message, format_timestamp

from ..records import Conversation, ConversationPage, MessagePage, User
from .base import PoolStats, StoreUnavailable
from .cursor import decode_cursor, encode_cursor
from .schema import SQLITE_COLUMNS, unanswered_sql
from .sqlite_ops import (
    MESSAGE_COLUMNS,
    create_schema,
    load_members,
    row_conversation,
    row_message,
    select_one,
    transaction,
    write_batch,
)

T = TypeVar("T")

BUSY_TIMEOUT_MS = 5_000
# Ids bound in one ``IN (...)``: well under SQLite's variable limit (999 before 3.32).
SQL_IDS_PER_QUERY = 500


class _Worker:
    """One thread owning one connection: sqlite3 objects must stay on the thread that made them."""

    def __init__(self, path: str, name: str, busy_timeout_ms: int) -> None:
        self._path = path
        self._busy_timeout_ms = busy_timeout_ms
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._conn: sqlite3.Connection | None = None
        self._closed = False

    def _connect(self) -> sqlite3.Connection:
        # Autocommit mode: transactions are opened explicitly where they are needed.
        conn = sqlite3.connect(
            self._path,
            isolation_level=None,
            check_same_thread=False,
            timeout=self._busy_timeout_ms / 1000,
        )
        conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        return conn

    def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._conn is None:
            self._conn = self._connect()
        return fn(self._conn)

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._closed:
            raise StoreUnavailable("store is closed")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, self._call, fn)
        except (sqlite3.IntegrityError, sqlite3.ProgrammingError):
            raise  # a bug or bad data, not an outage: retrying would not help
        except sqlite3.DatabaseError as exc:
            raise StoreUnavailable(str(exc)) from exc

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._close)
        # The queue is empty now, so the thread exits at once; no need to block on it.
        self._executor.shutdown(wait=False)


class SqliteStore:
    name = "sqlite"

    def __init__(self, path: str, *, busy_timeout_ms: int = BUSY_TIMEOUT_MS) -> None:
        self.path = path
        self.busy_timeout_ms = busy_timeout_ms
        self._writer: _Worker | None = None
        self._reader: _Worker | None = None

    async def start(self) -> None:
        writer = _Worker(self.path, "sqlite-writer", self.busy_timeout_ms)
        # An in-memory database exists only on its own connection, so reads share the writer.
        reader = (
            writer
            if self.path == ":memory:"
            else _Worker(self.path, "sqlite-reader", self.busy_timeout_ms)
        )
        try:
            await writer.run(create_schema)
            await reader.run(select_one)
        except BaseException:
            await reader.close()
            await writer.close()
            raise
        self._writer, self._reader = writer, reader

    async def close(self) -> None:
        writer, reader = self._writer, self._reader
        self._writer = self._reader = None
        if reader is not None and reader is not writer:
            await reader.close()
        if writer is not None:
            await writer.close()

    def _w(self) -> _Worker:
        if self._writer is None:
            raise StoreUnavailable("store is not started")
        return self._writer

    def _r(self) -> _Worker:
        if self._reader is None:
            raise StoreUnavailable("store is not started")
        return self._reader

    async def ping(self) -> None:
        await self._r().run(select_one)

    async def ensure_user(self, user_id: str, tier: str, role: str) -> None:
        now = format_timestamp(datetime.now(UTC))

        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT OR IGNORE INTO users (id, tier, role, is_active, created_at) "
                "VALUES (?, ?, ?, 1, ?)",
                (user_id, tier, role, now),
            )

        await self._w().run(op)

    def pool_stats(self) -> dict[str, PoolStats]:
        return {}  # a connection per worker thread, no pool

    async def get_user(self, user_id: str) -> User | None:
        def op(conn: sqlite3.Connection) -> User | None:
            row = conn.execute("SELECT id, tier, role FROM users WHERE id = ?", (user_id,))
            found = row.fetchone()
            return User(*found) if found is not None else None

        return await self._r().run(op)

    async def create_conversation(self, conversation: Conversation) -> None:
        c = conversation
        # The owner is always a member: a conversation must show up in its owner's list.
        members = list(dict.fromkeys((*c.members, c.owner_id)))

        def op(conn: sqlite3.Connection) -> None:
            with transaction(conn):
                conn.execute(
                    "INSERT OR IGNORE INTO conversations "
                    "(id, agent_id, title, owner_id, created_at, updated_at) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (c.id, c.agent_id, c.title, c.owner_id, c.created_at, c.updated_at),
                )
                conn.executemany(
                    "INSERT OR IGNORE INTO conversation_members (conversation_id, user_id) "
                    "VALUES (?, ?)",
                    [(c.id, user) for user in members],
                )

        await self._w().run(op)

    async def get_conversation(self, conversation_id: str) -> Conversation | None:
        return (await self.get_conversations((conversation_id,))).get(conversation_id)

    async def get_conversations(self, conversation_ids: Sequence[str]) -> dict[str, Conversation]:
        def op(conn: sqlite3.Connection) -> dict[str, Conversation]:
            found: dict[str, Conversation] = {}
            ids = list(dict.fromkeys(conversation_ids))
            for at in range(0, len(ids), SQL_IDS_PER_QUERY):
                part = ids[at : at + SQL_IDS_PER_QUERY]
                rows = conn.execute(
                    "SELECT id, agent_id, title, owner_id, created_at, updated_at "
                    f"FROM conversations WHERE id IN ({','.join('?' * len(part))})",
                    part,
                ).fetchall()
                members = load_members(conn, [row[0] for row in rows])
                found.update((row[0], row_conversation(row, members[row[0]])) for row in rows)
            return found

        return await self._r().run(op)

    async def list_conversations(
        self, user_id: str, cursor: str | None, limit: int
    ) -> ConversationPage:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        after = decode_cursor(cursor) if cursor is not None else None

        def op(conn: sqlite3.Connection) -> ConversationPage:
            sql = (
                "SELECT c.id, c.agent_id, c.title, c.owner_id, c.created_at, c.updated_at "
                "FROM conversation_members m JOIN conversations c ON c.id = m.conversation_id "
                "WHERE m.user_id = ?"
            )
            args: list[Any] = [user_id]
            if after is not None:
                sql += " AND (c.updated_at, c.id) < (?, ?)"
                args.extend(after)
            sql += " ORDER BY c.updated_at DESC, c.id DESC LIMIT ?"
            args.append(limit + 1)
            rows = conn.execute(sql, args).fetchall()
            has_more = len(rows) > limit
            rows = rows[:limit]
            members = load_members(conn, [row[0] for row in rows])
            items = tuple(row_conversation(row, members[row[0]]) for row in rows)
            last = items[-1] if items else None
            next_cursor = (
                encode_cursor(last.updated_at, last.id) if has_more and last is not None else None
            )
            return ConversationPage(items=items, next_cursor=next_cursor, has_more=has_more)

        return await self._r().run(op)

    async def write_messages(self, messages: Sequence[Message]) -> int:
        if not messages:
            return 0
        batch = list(messages)
        return await self._w().run(lambda conn: write_batch(conn, batch))

    async def messages_before(
        self, conversation_id: str, before: int | None, limit: int
    ) -> MessagePage:
        if limit < 1:
            return MessagePage(messages=(), has_more=False)

        def op(conn: sqlite3.Connection) -> MessagePage:
            sql = f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE conversation_id = ?"
            args: list[Any] = [conversation_id]
            if before is not None:
                sql += ' AND "offset" < ?'
                args.append(before)
            sql += ' ORDER BY "offset" DESC LIMIT ?'
            args.append(limit + 1)
            rows = conn.execute(sql, args).fetchall()
            has_more = len(rows) > limit
            page = [row_message(row) for row in rows[:limit]]
            page.reverse()
            return MessagePage(messages=tuple(page), has_more=has_more)

        return await self._r().run(op)

    async def max_offset(self, conversation_id: str) -> int:
        def op(conn: sqlite3.Connection) -> int:
            row = conn.execute(
                'SELECT COALESCE(MAX("offset"), 0) FROM messages WHERE conversation_id = ?',
                (conversation_id,),
            ).fetchone()
            return int(row[0])

        return await self._r().run(op)

    async def find_by_client_msg_id(
        self, conversation_id: str, user_id: str | None, client_msg_id: str
    ) -> Message | None:
        def op(conn: sqlite3.Connection) -> Message | None:
            row = conn.execute(
                f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE conversation_id = ? "
                'AND user_id IS ? AND client_msg_id = ? ORDER BY "offset" LIMIT 1',
                (conversation_id, user_id, client_msg_id),
            ).fetchone()
            return row_message(row) if row is not None else None

        return await self._r().run(op)

    async def remove_member(self, conversation_id: str, user_id: str) -> bool:
        def op(conn: sqlite3.Connection) -> bool:
            with transaction(conn):
                cursor = conn.execute(
                    "DELETE FROM conversation_members WHERE conversation_id = ? AND user_id = ?",
                    (conversation_id, user_id),
                )
            return cursor.rowcount > 0

        return await self._w().run(op)

    async def count_owned_conversations(self, user_id: str) -> int:
        def op(conn: sqlite3.Connection) -> int:
            row = conn.execute(
                "SELECT count(*) FROM conversations WHERE owner_id = ?", (user_id,)
            ).fetchone()
            return int(row[0])

        return await self._w().run(op)

    async def unanswered(self, within_s: float, limit: int = 10_000) -> list[Message]:
        since = format_timestamp(datetime.fromtimestamp(time.time() - within_s, UTC))
        sql = unanswered_sql(SQLITE_COLUMNS, "?", "?")

        def op(conn: sqlite3.Connection) -> list[Message]:
            return [row_message(row) for row in conn.execute(sql, (since, limit)).fetchall()]

        return await self._r().run(op)

    async def usage_on(self, user_id: str, day: str) -> int:
        def op(conn: sqlite3.Connection) -> int:
            row = conn.execute(
                "SELECT COALESCE(SUM(input_tokens + output_tokens), 0) FROM usage "
                "WHERE user_id = ? AND day = ?",
                (user_id, day),
            ).fetchone()
            return int(row[0])

        return await self._r().run(op)
