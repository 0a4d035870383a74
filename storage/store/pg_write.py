"""The batch write of the Postgres store: one transaction per batch, exactly once.

A batch is written optimistically first, as if none of it were stored (the common case):

- big batches (``COPY_THRESHOLD`` rows and more): first, in a short transaction of its own
  (the bump), ``conversations.updated_at`` (and its copy in ``conversation_members``) moves to
  the batch's newest message per conversation, never backwards. Then, in the batch's
  transaction, the rows, sorted by primary key, are COPYed straight into ``messages``, and one
  statement adds the usage of the assistant replies to the daily row of the user who wrote
  the replied-to message (looked up in ``messages`` when that message is not in the batch),
  on the reply's UTC day;
- small batches: one statement inserts ``unnest`` of one array of rows (the composite type
  ``ROW_TYPE``) and does the same upkeep, bump included (no DDL, no COPY set-up: cheaper
  below the threshold; ``bench/persist.py``).

The bump is idempotent: one whose batch then fails, or is replayed, does no harm, and one
lost with its batch (a crash in between) is done again when the batch is retried or claimed.
It commits without waiting for the WAL flush: the batch's commit, which follows it, flushes
the WAL up to a later point and so makes the bump durable with the messages, never without
them. Under load every batch touches the same conversations; in a transaction of their own,
their locks are held for one short statement, not for a whole COPY and its commit, so
concurrent writers do not queue behind each other's batches.

If any row is already stored (a replay: a batch re-read after a crash between commit and
ack, or claimed from a dead instance), the primary key refuses it (it holds the partition key
``created_at``, which the outbox entry carries, so a replayed row always conflicts), the whole
transaction rolls back, and the batch is written again the careful way: into a staging table
(``CREATE TEMP TABLE ... ON COMMIT DROP``: no session state, PgBouncer-safe) or from the
array of rows, with ``INSERT ... ON CONFLICT DO NOTHING ... RETURNING`` so that only the rows
inserted now are counted and charged.

Locks are taken in one order by every writer: messages by primary key, conversations by id
(``FOR NO KEY UPDATE`` in a sorted CTE), usage rows by (user, day). Concurrent writers and
replays therefore cannot deadlock.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, date, datetime
from operator import itemgetter
from typing import Any

from protocol import Message

from .schema import INDEX, PRIMARY_KEY, message_values
from .schema import MESSAGE_COLUMNS as COLUMNS

# At and above this many rows a batch goes through COPY; below, through unnest (measured by
# bench/persist.py: even up to ~100 rows, COPY ahead from ~500).
COPY_THRESHOLD = 500

STAGE_TABLE = "chat_stage"
# The composite type of a staged row (migration 0003): a small batch is one array of these.
ROW_TYPE = "message_batch_row"

# (column, Postgres type) of a message row, in the order ``Batch.rows`` holds them.
MESSAGE_COLUMNS: tuple[tuple[str, str], ...] = tuple((c.name, c.pg_type) for c in COLUMNS)
# Staged rows add the replied-to message's author when it is in the same batch.
STAGE_COLUMNS = (*MESSAGE_COLUMNS, ("charge_to", "text"))
_MESSAGE_NAMES = [name for name, _ in MESSAGE_COLUMNS]
_STAGE_NAMES = [name for name, _ in STAGE_COLUMNS]
_COLS = ", ".join(f'"{n}"' for n in _MESSAGE_NAMES)
_KEY = itemgetter(*(INDEX[name] for name in PRIMARY_KEY))
_CONVERSATION, _CREATED = INDEX["conversation_id"], INDEX["created_at"]
_INPUT, _OUTPUT, _REPLY_TO = INDEX["input_tokens"], INDEX["output_tokens"], INDEX["reply_to"]

# For write transactions that set them (through PgBouncer, and replays; directly on Postgres
# the connections start with them): JIT compilation costs more than it saves on these plans,
# and a cached generic plan of an unnest statement (planned for a 10-row guess of the arrays)
# turns a 1,000-row batch into seconds of nested loops; custom plans see the real sizes.
WRITE_SETTINGS = "SET LOCAL jit = off; SET LOCAL plan_cache_mode = force_custom_plan"

CREATE_STAGE = (
    f"{WRITE_SETTINGS}; CREATE TEMP TABLE {STAGE_TABLE} ("
    + ", ".join(f'"{n}" {t}' for n, t in STAGE_COLUMNS)
    + ") ON COMMIT DROP"
)

# The rows' columns come named by the type's attributes, which are STAGE_COLUMNS.
_UNNEST_ROWS = f"unnest($1::{ROW_TYPE}[]) AS s"

# Conversations to move forward: (id, newest created_at) from ``newest``, locked in id order.
_BUMP = """
locked AS MATERIALIZED (
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
)"""

# Usage of ``replies`` (charge_to, conversation_id, reply_to, day, input, output), summed per
# (user, day). The look-up finds the author of a replied-to message stored by an earlier batch.
_CHARGE = """
charged AS (
    INSERT INTO usage AS u (user_id, day, input_tokens, output_tokens)
    SELECT who, day, sum(input_tokens), sum(output_tokens) FROM (
        SELECT
            COALESCE(
                r.charge_to,
                (SELECT q.user_id FROM messages q
                 WHERE q.conversation_id = r.conversation_id AND q.id = r.reply_to
                 ORDER BY q.created_at DESC LIMIT 1)
            ) AS who,
            r.day, r.input_tokens, r.output_tokens
        FROM replies r
        OFFSET 0  -- a fence: the look-up runs once per reply, not again for the filter below
    ) AS x
    WHERE who IS NOT NULL
    GROUP BY who, day
    ORDER BY who, day
    ON CONFLICT (user_id, day) DO UPDATE SET
        input_tokens = u.input_tokens + EXCLUDED.input_tokens,
        output_tokens = u.output_tokens + EXCLUDED.output_tokens
)"""

# The bump and the charge of a big batch, from arrays computed here.
BUMP = f"""
WITH newest AS (
    SELECT * FROM unnest($1::text[], $2::timestamptz[]) AS n(conversation_id, at)
), {_BUMP.strip()}
SELECT count(*) FROM locked
"""
CHARGE = f"""
WITH replies AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::date[], $5::bigint[], $6::bigint[])
        AS r(charge_to, conversation_id, reply_to, day, input_tokens, output_tokens)
), {_CHARGE.strip()}
SELECT 1
"""
BUMP_SETTINGS = "SET LOCAL synchronous_commit = off; SET LOCAL jit = off"


def _insert_sql(source: str, materialized: str, *, fresh: bool) -> str:
    """Insert rows of ``source`` and do the upkeep, in one statement; returns the count new."""
    if fresh:  # every row is new (else the statement fails): plain insert, upkeep from all
        conflict, returning, inserted = "", "1", "src s"
    else:  # a replay: skip stored rows, and count and charge only the rows inserted now
        conflict = "ON CONFLICT DO NOTHING"
        returning = 'conversation_id, "offset", created_at'
        inserted = (
            "ins i JOIN src s ON s.conversation_id = i.conversation_id "
            'AND s."offset" = i."offset" AND s.created_at = i.created_at'
        )
    # A message given twice in one batch fails the fresh attempt like a replay; the careful
    # one keeps one copy (its usage is charged once).
    distinct = "" if fresh else 'DISTINCT ON (conversation_id, "offset", created_at)'
    return f"""
WITH src AS {materialized} (
    SELECT {distinct} * FROM {source}
), ins AS (
    INSERT INTO messages ({_COLS})
    SELECT {_COLS} FROM src ORDER BY conversation_id, "offset", created_at
    {conflict}
    RETURNING {returning}
), newest AS (
    SELECT conversation_id, max(created_at) AS at FROM src GROUP BY conversation_id
), {_BUMP.strip()}, replies AS (
    SELECT s.charge_to, s.conversation_id, s.reply_to,
        (s.created_at AT TIME ZONE 'UTC')::date AS day, s.input_tokens, s.output_tokens
    FROM {inserted}
    WHERE s.role = 'assistant' AND s.reply_to IS NOT NULL
        AND s.input_tokens IS NOT NULL AND s.input_tokens + s.output_tokens > 0
), {_CHARGE.strip()}
SELECT count(*) FROM ins
"""


# Materialized: src is read three times, and DISTINCT ON must not run for each.
INSERT_FROM_ROWS = {
    fresh: _insert_sql(_UNNEST_ROWS, "MATERIALIZED", fresh=fresh) for fresh in (True, False)
}
INSERT_FROM_STAGE = _insert_sql(STAGE_TABLE, "MATERIALIZED", fresh=False)


class Batch:
    """A batch as rows for Postgres: one tuple per message, sorted by primary key.

    Nothing else per message that the garbage collector tracks: under a backlog the outbox
    holds many objects, and each full collection walks all of them. What the upkeep needs
    (each conversation's newest message, the replies that carry usage) is gathered in the
    same pass over the messages: a second pass over a 10,000-row batch cost ~3 ms of Python
    (``bench/persist.py``).
    """

    __slots__ = ("authors", "known", "newest", "replies", "rows")

    def __init__(
        self,
        messages: Sequence[Message],
        known: Mapping[str, str] | None = None,
        *,
        clean: bool = False,
    ) -> None:
        """``clean``: after Postgres refused the batch's data, make every value storable."""
        if clean:
            messages = [_storable(m) for m in messages]
        # Who wrote each message of the batch; ``known`` adds authors of earlier batches.
        authors: dict[str, str] = {}
        newest: dict[str, datetime] = {}
        replies: list[tuple[Any, ...]] = []  # rows of assistant replies that carry usage
        rows: list[tuple[Any, ...]] = []
        utc = UTC
        for m in messages:
            text, raw = m.text, None
            if "\x00" in text or (clean and storable(text) != text):
                # Postgres text holds neither NUL nor lone surrogates: keep the exact text
                # beside a readable one.
                raw = text.encode("utf-8", "surrogatepass")
                text = storable(text)
            at = datetime.fromisoformat(m.created_at)  # RFC 3339 with "Z" (Python 3.11+)
            if at.tzinfo is None:  # never a reason to refuse a batch: no zone means UTC
                at = at.replace(tzinfo=utc)
            cid, usage, user = m.conversation_id, m.usage, m.user_id
            if user is not None:
                authors[m.id] = user
            if cid not in newest or at > newest[cid]:
                newest[cid] = at
            row = message_values(m, at, text, raw)
            rows.append(row)
            if (
                usage is not None
                and m.role == "assistant"
                and m.reply_to is not None
                and usage.input_tokens + usage.output_tokens > 0
            ):
                replies.append(row)
        rows.sort(key=_KEY)  # one lock order for every writer, and index-friendly
        self.rows = rows
        self.authors = authors
        self.known = known if known is not None else {}
        self.newest = newest
        self.replies = replies

    def __len__(self) -> int:
        return len(self.rows)

    def author(self, message_id: str | None) -> str | None:
        """The author of a replied-to message, when known here (else Postgres is asked)."""
        if message_id is None:
            return None
        found = self.authors.get(message_id)
        return found if found is not None else self.known.get(message_id)

    def _charge_to(self, row: tuple[Any, ...]) -> str | None:
        return self.author(row[_REPLY_TO])

    def staged(self) -> list[tuple[Any, ...]]:
        """Rows with the ``charge_to`` column (for the staging table, or as ``ROW_TYPE``)."""
        return [(*row, self._charge_to(row)) for row in self.rows]

    def bump_args(self) -> list[list[Any]]:
        """The arguments of ``BUMP``: the newest message of each conversation."""
        return [list(self.newest), list(self.newest.values())]

    def charge_args(self) -> list[list[Any]]:
        """The arguments of ``CHARGE``: usage per (user, day), and replies of unknown authors."""
        known: dict[tuple[str, date], list[int]] = {}
        unknown: list[tuple[str, str, date, int, int]] = []
        for row in self.replies:
            reply_to, tokens_in, tokens_out = row[_REPLY_TO], row[_INPUT], row[_OUTPUT]
            day = row[_CREATED].astimezone(UTC).date()
            who = self.author(reply_to)
            if who is None:
                unknown.append((row[_CONVERSATION], reply_to, day, tokens_in, tokens_out))
                continue
            total = known.get((who, day))
            if total is None:
                known[(who, day)] = [tokens_in, tokens_out]
            else:
                total[0] += tokens_in
                total[1] += tokens_out
        charge: list[str | None] = [who for who, _ in known]
        charge.extend([None] * len(unknown))
        return [
            charge,
            [None] * len(known) + [u[0] for u in unknown],
            [None] * len(known) + [u[1] for u in unknown],
            [day for _, day in known] + [u[2] for u in unknown],
            [t[0] for t in known.values()] + [u[3] for u in unknown],
            [t[1] for t in known.values()] + [u[4] for u in unknown],
        ]


class RecentAuthors(Mapping[str, str]):
    """Authors of recently written messages (message id -> user id), two generations deep.

    Replies usually answer a message of the same or the previous batch: knowing its author
    here saves a look-up in Postgres per reply. Ids and authors never change, so a stale
    entry cannot be wrong; a miss just means Postgres is asked.
    """

    def __init__(self, capacity: int = 10_000) -> None:
        self.capacity = capacity
        self._new: dict[str, str] = {}
        self._old: dict[str, str] = {}

    @property
    def held(self) -> int:
        """Entries of both generations (at most twice the capacity: a batch is smaller)."""
        return len(self._new) + len(self._old)

    def remember(self, authors: Mapping[str, str]) -> None:
        if len(self._new) + len(authors) > self.capacity:
            self._old, self._new = self._new, {}
        self._new.update(authors)

    def __getitem__(self, message_id: str) -> str:
        found = self._new.get(message_id)
        return found if found is not None else self._old[message_id]

    def get(self, message_id: str, default: Any = None) -> Any:  # per reply: no KeyError
        found = self._new.get(message_id)
        return found if found is not None else self._old.get(message_id, default)

    def __iter__(self) -> Iterator[str]:
        yield from self._new
        yield from (k for k in self._old if k not in self._new)

    def __len__(self) -> int:
        return len(self._new) + sum(1 for k in self._old if k not in self._new)


_INT4_MAX = 2**31 - 1


def storable(value: str) -> str:
    """``value`` as Postgres text can hold it: NUL and lone surrogates become U+FFFD."""
    if value.isascii() and "\x00" not in value:
        return value
    return "".join("\ufffd" if ch == "\x00" or "\ud800" <= ch <= "\udfff" else ch for ch in value)


def _storable(m: Message) -> Message:
    """A message whose ids and names Postgres accepts (its text is kept exactly elsewhere).

    Only for input that the protocol should have refused: a message Postgres cannot store
    must not block the batch writer, and with it every other message, forever.
    """
    names = ("id", "conversation_id", "role", "user_id", "agent_id", "client_msg_id")
    changes: dict[str, Any] = {
        name: storable(value)
        for name in (*names, "finish_reason", "model", "reply_to")
        if isinstance(value := getattr(m, name), str)
    }
    if m.usage is not None:
        changes["usage"] = type(m.usage)(
            min(m.usage.input_tokens, _INT4_MAX), min(m.usage.output_tokens, _INT4_MAX)
        )
    return replace(m, **changes)


async def bump_then_write_direct(conn: Any, batch: Batch) -> int:
    """The bump, then COPY straight into messages and the charge. Fails on a replay.

    Two transactions on one connection: outside any transaction when called.
    """
    async with conn.transaction():
        await conn.execute(BUMP_SETTINGS)
        await conn.fetchval(BUMP, *batch.bump_args())
    async with conn.transaction():
        await conn.execute(WRITE_SETTINGS)
        await conn.copy_records_to_table("messages", records=batch.rows, columns=_MESSAGE_NAMES)
        await conn.fetchval(CHARGE, *batch.charge_args())
    return len(batch)


async def write_staged(conn: Any, batch: Batch) -> int:
    """COPY into a staging table, then INSERT ... ON CONFLICT DO NOTHING. Inside a transaction."""
    await conn.execute(CREATE_STAGE)
    await conn.copy_records_to_table(STAGE_TABLE, records=batch.staged(), columns=_STAGE_NAMES)
    return int(await conn.fetchval(INSERT_FROM_STAGE))


async def write_rows(conn: Any, batch: Batch, *, fresh: bool, set_local: bool = True) -> int:
    """One statement over ``unnest`` of the rows. ``set_local``: inside a transaction,
    the write settings ``SET LOCAL`` first; else the connection has them from its start
    (``pg_connect.pool_options``), and the statement alone is its transaction: one round
    trip where BEGIN, SET, the statement and COMMIT took four."""
    if set_local:
        await conn.execute(WRITE_SETTINGS)
    return int(await conn.fetchval(INSERT_FROM_ROWS[fresh], batch.staged()))
