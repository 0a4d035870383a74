"""The batch write of the Postgres store: one transaction, one statement doing the batch.

The rows reach the server either as arrays (``unnest``: the statement carries them) or
through ``COPY`` into a staging table created in the transaction with ``ON COMMIT DROP`` (no
session state, so PgBouncer in transaction mode is fine). Either way one statement then

1. inserts the messages, ordered by primary key. A first attempt is a plain INSERT (the
   common case: nothing of the batch is stored yet, and a plain insert is cheaper than a
   speculative one); when it meets a stored row (unique violation: a replay), the
   transaction is rolled back and the batch is written again with ``ON CONFLICT DO NOTHING``,
   which skips the stored rows (the key holds the partition key ``created_at``, which the
   outbox entry carries, so a replayed row always conflicts);
2. moves ``conversations.updated_at`` (and its copy in ``conversation_members``) to the newest
   message of the batch, never backwards, locking the conversations in id order first so that
   concurrent writers cannot deadlock on them;
3. adds the usage of the assistant replies it actually inserted (``RETURNING``) to the daily
   row of the user who wrote the replied-to message, on the reply's UTC day.

It returns how many messages were new. ``bench/persist.py`` measures both ways of sending rows;
small batches go through ``unnest`` (no DDL per batch), big ones through ``COPY``.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from protocol import Message

# At and above this many rows a batch goes through COPY; the bench shows where COPY's extra
# round trips and DDL pay for themselves.
COPY_THRESHOLD = 500

STAGE_TABLE = "chat_stage"

# (column, Postgres type) of a staged row, in the order ``stage_rows`` builds them.
STAGE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("conversation_id", "text"),
    ("offset", "bigint"),
    ("created_at", "timestamptz"),
    ("id", "text"),
    ("role", "text"),
    ("text", "text"),
    ("text_raw", "bytea"),
    ("user_id", "text"),
    ("agent_id", "text"),
    ("client_msg_id", "text"),
    ("finish_reason", "text"),
    ("input_tokens", "integer"),
    ("output_tokens", "integer"),
    ("model", "text"),
    ("reply_to", "text"),
    ("charge_to", "text"),  # the replied-to message's author when it is in the same batch
)
_NAMES = [name for name, _ in STAGE_COLUMNS]
_MESSAGE_COLS = ", ".join(f'"{n}"' for n in _NAMES[:-1])

# For the write transaction only: JIT compilation costs more than it saves on these plans, and
# a cached generic plan of the unnest statement (planned for a 10-row guess of the arrays)
# turns a 1,000-row batch into seconds of nested loops; custom plans see the real sizes.
WRITE_SETTINGS = "SET LOCAL jit = off; SET LOCAL plan_cache_mode = force_custom_plan"

CREATE_STAGE = (
    f"{WRITE_SETTINGS}; "
    f"CREATE TEMP TABLE {STAGE_TABLE} ("
    + ", ".join(f'"{n}" {t}' for n, t in STAGE_COLUMNS)
    + ") ON COMMIT DROP"
)

_UNNEST = (
    "unnest("
    + ", ".join(f"${i}::{t}[]" for i, (_, t) in enumerate(STAGE_COLUMNS, start=1))
    + ") AS s("
    + ", ".join(f'"{n}"' for n in _NAMES)
    + ")"
)


def _write_sql(source: str, materialized: str, *, fresh: bool) -> str:
    """The batch statement. ``fresh``: insert without ON CONFLICT, every staged row is new."""
    if fresh:
        conflict, returning = "", "1"
        replies = "src i"
        charge_to = "i.charge_to"
    else:
        conflict = "ON CONFLICT DO NOTHING"
        returning = (
            'conversation_id, "offset", created_at, role, reply_to, input_tokens, output_tokens'
        )
        # Only what was inserted now is charged: a replayed reply is not charged twice.
        replies = (
            "ins i JOIN src s ON s.conversation_id = i.conversation_id "
            'AND s."offset" = i."offset" AND s.created_at = i.created_at'
        )
        charge_to = "s.charge_to"
    # A message given twice in one batch: the fresh attempt fails on it like on a replay, and
    # the retry keeps one copy (its usage must be charged once).
    distinct = "" if fresh else 'DISTINCT ON (conversation_id, "offset", created_at)'
    return f"""
WITH src AS {materialized} (
    SELECT {distinct} * FROM {source}
), ins AS (
    INSERT INTO messages ({_MESSAGE_COLS})
    SELECT {_MESSAGE_COLS} FROM src ORDER BY conversation_id, "offset", created_at
    {conflict}
    RETURNING {returning}
), newest AS (
    SELECT conversation_id, max(created_at) AS at FROM src GROUP BY conversation_id
), locked AS MATERIALIZED (
    SELECT c.id, n.at FROM conversations c JOIN newest n ON n.conversation_id = c.id
    WHERE c.updated_at < n.at
    ORDER BY c.id
    FOR NO KEY UPDATE OF c
), bump AS (
    UPDATE conversations c SET updated_at = l.at FROM locked l
    WHERE c.id = l.id AND c.updated_at < l.at
), bump_members AS (
    UPDATE conversation_members m SET updated_at = l.at FROM locked l
    WHERE m.conversation_id = l.id AND m.updated_at < l.at
), charged AS (
    INSERT INTO usage AS u (user_id, day, input_tokens, output_tokens)
    SELECT who, day, sum(input_tokens), sum(output_tokens) FROM (
        SELECT
            COALESCE(
                {charge_to},
                (SELECT q.user_id FROM messages q
                 WHERE q.conversation_id = i.conversation_id AND q.id = i.reply_to
                 ORDER BY q.created_at DESC LIMIT 1)
            ) AS who,
            (i.created_at AT TIME ZONE 'UTC')::date AS day,
            i.input_tokens,
            i.output_tokens
        FROM {replies}
        WHERE i.role = 'assistant' AND i.reply_to IS NOT NULL
            AND i.input_tokens IS NOT NULL AND i.input_tokens + i.output_tokens > 0
        OFFSET 0  -- a fence: the look-up runs once per reply, not again for the filter below
    ) AS replies
    WHERE who IS NOT NULL
    GROUP BY who, day
    ORDER BY who, day
    ON CONFLICT (user_id, day) DO UPDATE SET
        input_tokens = u.input_tokens + EXCLUDED.input_tokens,
        output_tokens = u.output_tokens + EXCLUDED.output_tokens
)
SELECT count(*) FROM ins
"""


# The staging table is read where it is needed; the arrays are unpacked once.
# fresh=True: the first attempt at a batch; fresh=False: after a unique violation (a replay).
WRITE_FROM_STAGE = {
    fresh: _write_sql(STAGE_TABLE, "NOT MATERIALIZED", fresh=fresh) for fresh in (True, False)
}
WRITE_FROM_ARRAYS = {
    fresh: _write_sql(_UNNEST, "MATERIALIZED", fresh=fresh) for fresh in (True, False)
}


def stage_rows(messages: Sequence[Message]) -> list[tuple[Any, ...]]:
    """The batch as staged rows, in batch order.

    One tuple per message and nothing else that the garbage collector tracks: under a backlog
    the outbox holds many objects, and each full collection walks all of them.
    """
    authors = {m.id: m.user_id for m in messages if m.user_id is not None}
    rows: list[tuple[Any, ...]] = []
    for m in messages:
        text, raw = m.text, None
        if "\x00" in text:
            raw = text.encode("utf-8")
            text = text.replace("\x00", "\ufffd")
        usage = m.usage
        rows.append(
            (
                m.conversation_id,
                m.offset,
                _when(m.created_at),
                m.id,
                m.role,
                text,
                raw,
                m.user_id,
                m.agent_id,
                m.client_msg_id,
                m.finish_reason,
                usage.input_tokens if usage is not None else None,
                usage.output_tokens if usage is not None else None,
                m.model,
                m.reply_to,
                authors.get(m.reply_to) if m.reply_to is not None else None,
            )
        )
    return rows


def _when(created_at: str) -> datetime:
    moment = datetime.fromisoformat(created_at)  # RFC 3339 with "Z" (Python 3.11+)
    # Never a reason to refuse a batch (it would block the writer): no zone means UTC.
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


async def write_copy(conn: Any, rows: Sequence[tuple[Any, ...]], *, fresh: bool) -> int:
    """COPY into the staging table, then the write statement. Call inside a transaction."""
    await conn.execute(CREATE_STAGE)
    await conn.copy_records_to_table(STAGE_TABLE, records=rows, columns=_NAMES)
    return int(await conn.fetchval(WRITE_FROM_STAGE[fresh]))


async def write_arrays(conn: Any, rows: Sequence[tuple[Any, ...]], *, fresh: bool) -> int:
    """The write statement over ``unnest`` of one array per column. Call inside a transaction."""
    columns = [list(column) for column in zip(*rows, strict=True)]
    await conn.execute(WRITE_SETTINGS)
    return int(await conn.fetchval(WRITE_FROM_ARRAYS[fresh], *columns))
