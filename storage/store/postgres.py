"""The production store: Postgres through asyncpg pools, an optional read replica, PgBouncer.

- Writes and the reads that must be fresh go to the primary pool; reads that may lag (older
  history pages, conversation lists, usage) go to the replica pool when one is configured and
  fall back to the primary while the replica cannot answer.
- ``pgbouncer=True`` (PgBouncer in transaction mode): no prepared statement cache
  (``statement_cache_size=0``: asyncpg then uses the unnamed statement, whose parse, bind and
  execute it sends before one Sync, so PgBouncer keeps them on one server connection), and
  no startup parameters PgBouncer would refuse. No session state is ever made: advisory
  locks are transaction-level, the staging table ``ON COMMIT DROP``, the write settings
  startup parameters (directly) or ``SET LOCAL`` (through PgBouncer).
- Connection failures, timeouts and transient server states raise ``StoreUnavailable``."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import date
from typing import Any, TypeVar

import asyncpg  # type: ignore[import-untyped]

from protocol import Message, parse_timestamp

from ..records import Conversation, ConversationPage, MessagePage, User
from .base import PoolStats, StoreUnavailable
from .cursor import decode_cursor, encode_cursor
from .pg_connect import create_pool, is_unavailable, pool_options
from .pg_migrate import check_schema, migrate
from .pg_partitions import PartitionReport, drop_old_partitions, ensure_partitions
from .pg_rows import (
    BY_CLIENT_MSG_ID_SQL,
    CONVERSATION_COLUMNS,
    CONVERSATIONS_BY_ID_SQL,
    MESSAGE_COLUMNS,
    UNANSWERED_SQL,
    USAGE_ON_SQL,
    row_conversation,
    row_message,
)
from .pg_write import (
    COPY_THRESHOLD,
    Batch,
    RecentAuthors,
    bump_then_write_direct,
    storable,
    write_rows,
    write_staged,
)

log = logging.getLogger("storage.store.postgres")

T = TypeVar("T")
Op = Callable[[Any], Awaitable[T]]


class PostgresStore:
    name = "postgres"

    def __init__(
        self,
        dsn: str,
        *,
        read_dsn: str | None = None,
        pool_min: int = 2,
        pool_max: int = 20,
        command_timeout_s: float = 10.0,
        pgbouncer: bool = False,
        migrate: bool = False,
        months_ahead: int = 3,
        copy_threshold: int = COPY_THRESHOLD,
        replica_retry_s: float = 5.0,
        recent_authors: int = 10_000,
    ) -> None:
        if pool_min > pool_max:
            raise ValueError("pool_min must not exceed pool_max")
        self.dsn = dsn
        self.read_dsn = read_dsn
        self.pool_min = pool_min
        self.pool_max = pool_max
        self.command_timeout_s = command_timeout_s
        self.pgbouncer = pgbouncer
        self.migrate = migrate
        self.months_ahead = months_ahead
        self.copy_threshold = copy_threshold
        self.replica_retry_s = replica_retry_s
        self._primary: Any = None
        self._replica: Any = None
        self._replica_down_until = 0.0
        self.replica_fallbacks = 0  # reads the replica failed and the primary answered
        # Who wrote recent messages (usage is charged to them): two generations of this many.
        self._authors = RecentAuthors(recent_authors)
        self.applied_migrations: list[int] = []  # by start(), when migrate=True
        self.start_partitions: PartitionReport | None = None  # what start() created

    # -- lifecycle -----------------------------------------------------------------------

    def _pool_options(self, min_size: int) -> dict[str, Any]:
        return pool_options(min_size, self.pool_max, self.command_timeout_s, self.pgbouncer)

    async def _create_pool(self, dsn: str, min_size: int) -> Any:
        return await create_pool(dsn, self._pool_options(min_size))

    async def start(self) -> None:
        self._primary = await self._create_pool(self.dsn, self.pool_min)
        try:
            async with self._primary.acquire() as conn:
                if self.migrate:
                    self.applied_migrations = await migrate(conn)
                else:
                    await check_schema(conn)
                self.start_partitions = await ensure_partitions(conn, self.months_ahead)
            if self.read_dsn is not None:
                try:
                    self._replica = await self._create_pool(self.read_dsn, self.pool_min)
                except StoreUnavailable as exc:
                    # Reads use the primary until the replica answers; connect lazily.
                    log.warning("read replica unavailable at start, using the primary: %s", exc)
                    self._replica = await asyncpg.create_pool(
                        self.read_dsn, **self._pool_options(0)
                    )
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        pools, self._primary, self._replica = (self._primary, self._replica), None, None
        for pool in pools:
            if pool is not None:
                try:
                    await pool.close()
                except Exception:
                    pool.terminate()

    def pool_stats(self) -> dict[str, PoolStats]:
        out: dict[str, PoolStats] = {}
        for name, pool in (("primary", self._primary), ("replica", self._replica)):
            if pool is not None:  # asyncpg's public Pool API
                size = int(pool.get_size())
                out[name] = (size, size - int(pool.get_idle_size()), int(pool.get_max_size()))
        return out

    def fill(self) -> dict[str, tuple[int, int]]:
        """Entries and bound of the recent authors, for the gauges."""
        return {"recent_authors": (self._authors.held, 2 * self._authors.capacity)}

    # -- running operations --------------------------------------------------------------

    async def _run(self, pool: Any, op: Op[T], *, transaction: bool = False) -> T:
        if pool is None:
            raise StoreUnavailable("store is not started")
        try:
            async with pool.acquire(timeout=self.command_timeout_s) as conn:
                if transaction:
                    async with conn.transaction():
                        return await op(conn)
                return await op(conn)
        except StoreUnavailable:
            raise
        except Exception as exc:
            if is_unavailable(exc):
                raise StoreUnavailable(f"Postgres unavailable: {exc!r}") from exc
            raise

    async def _primary_op(self, op: Op[T], *, transaction: bool = False) -> T:
        return await self._run(self._primary, op, transaction=transaction)

    async def _lagging_op(self, op: Op[T]) -> T:
        """A read that may be served from the replica; the primary answers when it cannot."""
        replica = self._replica
        if replica is not None and time.monotonic() >= self._replica_down_until:
            try:
                return await self._run(replica, op)
            except StoreUnavailable as exc:
                self._replica_down_until = time.monotonic() + self.replica_retry_s
                self.replica_fallbacks += 1
                log.warning("read replica failed, reading from the primary: %s", exc)
        return await self._primary_op(op)

    # -- maintenance ---------------------------------------------------------------------

    async def ensure_partitions(self, *, wait: bool = False) -> PartitionReport:
        """Create the partitions of this month and the next ones (the hourly job)."""
        return await self._primary_op(
            lambda conn: ensure_partitions(conn, self.months_ahead, wait=wait)
        )

    async def drop_old_partitions(self, retain_months: int) -> PartitionReport:
        return await self._primary_op(lambda conn: drop_old_partitions(conn, retain_months))

    # -- the Store protocol --------------------------------------------------------------

    async def ping(self) -> None:
        await self._primary_op(lambda conn: conn.fetchval("SELECT 1"))

    async def ensure_user(self, user_id: str, tier: str, role: str) -> None:
        await self._primary_op(
            lambda conn: conn.execute(
                "INSERT INTO users (id, tier, role) VALUES ($1, $2, $3) "
                "ON CONFLICT (id) DO NOTHING",
                user_id,
                tier,
                role,
            )
        )

    async def get_user(self, user_id: str) -> User | None:
        row = await self._primary_op(
            lambda conn: conn.fetchrow("SELECT id, tier, role FROM users WHERE id = $1", user_id)
        )
        return User(row["id"], row["tier"], row["role"]) if row is not None else None

    async def create_conversation(self, conversation: Conversation) -> None:
        c = conversation
        # The owner is always a member: a conversation must show up in its owner's list.
        members = list(dict.fromkeys((*c.members, c.owner_id)))
        created, updated = parse_timestamp(c.created_at), parse_timestamp(c.updated_at)
        await self._primary_op(
            lambda conn: conn.execute(
                "WITH conv AS ("
                "  INSERT INTO conversations "
                "  (id, agent_id, title, owner_id, created_at, updated_at) "
                "  VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (id) DO NOTHING"
                ") "
                "INSERT INTO conversation_members (conversation_id, user_id, position, updated_at) "
                "SELECT $1, u.user_id, u.position, "
                "  COALESCE((SELECT updated_at FROM conversations WHERE id = $1), $6) "
                "FROM unnest($7::text[]) WITH ORDINALITY AS u(user_id, position) "
                "ON CONFLICT DO NOTHING",
                c.id,
                c.agent_id,
                c.title,
                c.owner_id,
                created,
                updated,
                members,
            )
        )

    async def get_conversation(self, conversation_id: str) -> Conversation | None:
        return (await self.get_conversations((conversation_id,))).get(conversation_id)

    async def get_conversations(self, conversation_ids: Sequence[str]) -> dict[str, Conversation]:
        # Primary: this is the membership check of every join and send, and a conversation
        # created a moment ago on another instance must already be found.
        rows = await self._primary_op(
            lambda conn: conn.fetch(CONVERSATIONS_BY_ID_SQL, list(conversation_ids))
        )
        return {row["id"]: row_conversation(row) for row in rows}

    async def list_conversations(
        self, user_id: str, cursor: str | None, limit: int
    ) -> ConversationPage:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        after = decode_cursor(cursor) if cursor is not None else None
        sql = (
            f"SELECT {CONVERSATION_COLUMNS} "
            "FROM conversation_members m JOIN conversations c ON c.id = m.conversation_id "
            "WHERE m.user_id = $1 "
        )
        args: list[Any] = [user_id, limit + 1]
        if after is not None:
            try:
                at = parse_timestamp(after[0])
            except ValueError as exc:
                raise ValueError("invalid cursor") from exc
            if at.tzinfo is None:
                raise ValueError("invalid cursor")
            sql += "AND (m.updated_at, m.conversation_id) < ($3, $4) "
            args.extend([at, after[1]])
        sql += "ORDER BY m.updated_at DESC, m.conversation_id DESC LIMIT $2"
        # May lag: a list a second old is fine, and lists are the bulk of read traffic.
        rows = await self._lagging_op(lambda conn: conn.fetch(sql, *args))
        has_more = len(rows) > limit
        items = tuple(row_conversation(row) for row in rows[:limit])
        last = items[-1] if items else None
        next_cursor = (
            encode_cursor(last.updated_at, last.id) if has_more and last is not None else None
        )
        return ConversationPage(items=items, next_cursor=next_cursor, has_more=has_more)

    async def write_messages(self, messages: Sequence[Message]) -> int:
        if not messages:
            return 0
        try:
            new = await self._write(Batch(messages, self._authors))
        except (asyncpg.DataError, UnicodeEncodeError) as exc:
            # NUL or a lone surrogate in an id: input the protocol should have refused. Store
            # it made storable rather than block the batch writer (and everyone) forever.
            log.warning("batch refused by Postgres (%r): writing it with cleaned values", exc)
            new = await self._write(Batch(messages, self._authors, clean=True))
        return new

    async def _write(self, batch: Batch) -> int:
        big = len(batch) >= self.copy_threshold
        try:
            if big:
                new = await self._primary_op(lambda conn: bump_then_write_direct(conn, batch))
            else:
                new = await self._primary_op(  # directly: one statement, one round trip
                    lambda conn: write_rows(conn, batch, fresh=True, set_local=self.pgbouncer),
                    transaction=self.pgbouncer,
                )
        except asyncpg.UniqueViolationError:
            # Some of the batch is stored already (a replay): write it again, skipping those.
            new = await self._primary_op(
                lambda conn: (
                    write_staged(conn, batch) if big else write_rows(conn, batch, fresh=False)
                ),
                transaction=True,
            )
        self._authors.remember(batch.authors)
        return new

    async def messages_before(
        self, conversation_id: str, before: int | None, limit: int
    ) -> MessagePage:
        if limit < 1:
            return MessagePage(messages=(), has_more=False)
        sql = f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE conversation_id = $1 "
        args: list[Any] = [conversation_id, limit + 1]
        if before is not None:
            sql += 'AND "offset" < $3 '
            args.append(before)
        sql += 'ORDER BY "offset" DESC LIMIT $2'

        async def op(conn: Any) -> list[Any]:
            return list(await conn.fetch(sql, *args))

        # The latest page (no bound) rebuilds a missing hot window next to max_offset(): it
        # must be fresh, so the primary. Pages below an offset are older history, which the
        # replica has long since replayed.
        rows = await (self._primary_op(op) if before is None else self._lagging_op(op))
        has_more = len(rows) > limit
        page = [row_message(row) for row in rows[:limit]]
        page.reverse()
        return MessagePage(messages=tuple(page), has_more=has_more)

    async def max_offset(self, conversation_id: str) -> int:
        # Primary: a window rebuilt from a lagging offset would hand out offsets twice.
        value = await self._primary_op(
            lambda conn: conn.fetchval(
                'SELECT COALESCE(MAX("offset"), 0) FROM messages WHERE conversation_id = $1',
                conversation_id,
            )
        )
        return int(value)

    async def find_by_client_msg_id(
        self, conversation_id: str, user_id: str | None, client_msg_id: str
    ) -> Message | None:
        # Primary: idempotency checks must see the message stored a moment ago.
        row = await self._primary_op(
            lambda conn: conn.fetchrow(
                BY_CLIENT_MSG_ID_SQL,
                storable(conversation_id),
                None if user_id is None else storable(user_id),
                storable(client_msg_id),  # as a hostile id was stored (see write_messages)
            )
        )
        return row_message(row) if row is not None else None

    async def remove_member(self, conversation_id: str, user_id: str) -> bool:
        status = await self._primary_op(
            lambda conn: conn.execute(
                "DELETE FROM conversation_members WHERE conversation_id = $1 AND user_id = $2",
                conversation_id,
                user_id,
            )
        )
        return str(status) != "DELETE 0"

    async def count_owned_conversations(self, user_id: str) -> int:
        value = await self._primary_op(
            lambda conn: conn.fetchval(
                "SELECT count(*) FROM conversations WHERE owner_id = $1", user_id
            )
        )
        return int(value)

    async def unanswered(self, within_s: float, limit: int = 10_000) -> list[Message]:
        rows = await self._primary_op(
            lambda conn: conn.fetch(UNANSWERED_SQL, float(within_s), limit)
        )
        return [row_message(row) for row in rows]

    async def usage_on(self, user_id: str, day: str) -> int:
        when = date.fromisoformat(day)
        # May lag: quota checks tolerate a second of staleness.
        value = await self._lagging_op(lambda conn: conn.fetchval(USAGE_ON_SQL, user_id, when))
        return int(value)
