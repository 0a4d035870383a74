"""Persistence throughput on Postgres, every writer on the same table, in one run.

    .venv/bin/python bench/persist.py [--rows 80000] [--rounds 4] [--out bench/results]

Starts a throwaway Postgres (tests/services/postgres.py) with fsync ON, migrates it like the server
does (partitioned ``messages`` with its indexes, monthly partitions, conversations with
members), and measures rows/s, each scenario from an empty table after a checkpoint, of:

- raw COPY of the stream's 10,000-row batches straight into ``messages``, each sorted by
  key like the store sorts it: the ceiling (no dedup, no conversation or usage upkeep); and
  the same batches in arrival order, as a naive writer would COPY them;
- the store's first attempt at a big batch: the bump of updated_at in a transaction of its
  own, then COPY straight into ``messages`` (sorted) + the usage charge, 1 and 2 writers;
- COPY into a staging table + INSERT ... ON CONFLICT DO NOTHING with the same upkeep (the
  store's path for a batch that turns out to be a replay), 1 and 2 writers;
- unnest: one INSERT ... SELECT FROM unnest(arrays) statement with the upkeep;
- replaying already-stored batches through the store (first attempt fails, careful one skips);
- one INSERT per message (autocommit): the naive writer;
- both first attempts at small batch sizes (where the store switches from unnest to COPY);
- END TO END: MemoryOutbox -> BatchWriter -> PostgresStore as the server builds it, 1 and 2
  batch writers, from the first read of a full outbox to the commit of the last message;
- the same pipeline with parts of the upkeep left out: COPY only (no updated_at bump, no
  usage charge), COPY + charge, bump + COPY, and all of it with the members' copy of
  updated_at unindexed (every bump HOT: the floor of any bump): what each part costs end to
  end, in the same rounds;
- the upkeep statements alone, the store's forms beside cheaper-looking ones that give up the
  one lock order.

The main scenarios run in interleaved rounds (median reported) so that a noisy neighbour or a
checkpoint hits all of them alike; the end-to-end / raw COPY ratio is taken within each round.
Prints a table (median and best of the rounds) and where the time of one batch goes, and
writes ``bench/results/persist-<date>.json``. About 2.5 minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from protocol import Message, Usage, format_timestamp  # noqa: E402
from storage.batch_writer import BatchWriter  # noqa: E402
from storage.outbox.memory import MemoryOutbox  # noqa: E402
from storage.records import Conversation  # noqa: E402
from storage.store.pg_write import (  # noqa: E402
    BUMP,
    BUMP_SETTINGS,
    CHARGE,
    MESSAGE_COLUMNS,
    WRITE_SETTINGS,
    Batch,
    RecentAuthors,
    write_staged,
)
from storage.store.postgres import PostgresStore  # noqa: E402
from tests.services import PostgresServer  # noqa: E402

BATCH = 10_000
CONVERSATIONS = 2_000
RAW = "raw COPY (10k batches)"
RAW_ARRIVAL = "raw COPY, rows in arrival order (unsorted)"
DIRECT_1 = "store: COPY + upkeep, 1 writer"
DIRECT_2 = "store: COPY + upkeep, 2 writers"
STAGE_1 = "COPY staging + INSERT ON CONFLICT, 1 writer"
STAGE_2 = "COPY staging + INSERT ON CONFLICT, 2 writers"
UNNEST = "unnest INSERT + upkeep, 1 writer"
REPLAY = "replay of stored batches (store)"
SINGLE = "one INSERT per message"
E2E_1 = "END TO END outbox->BatchWriter->store, 1 writer"
E2E_2 = "END TO END outbox->BatchWriter->store, 2 writers"
BARE_2 = "the same pipeline, COPY only (no bump, no charge), 2 writers"
CHARGE_2 = "the same pipeline, COPY + charge (no bump), 2 writers"
BUMP_2 = "the same pipeline, bump + COPY (no charge), 2 writers"
HOT_2 = "the same pipeline, all of it, members' updated_at unindexed (HOT), 2 writers"
# (name, bump, charge) of the partial pipelines, and whether the members' index is dropped.
PARTS = ((BARE_2, False, False, False), (CHARGE_2, False, True, False),
         (BUMP_2, True, False, False), (HOT_2, True, True, True))  # fmt: skip
MEMBERS_BY_USER = (
    "CREATE INDEX members_by_user ON conversation_members "
    "(user_id, updated_at DESC, conversation_id DESC)"
)
GOAL = 0.6  # end to end over raw COPY (issue #4)
_RAW_COLUMNS = [name for name, _ in MESSAGE_COLUMNS]  # the order of Batch.rows


class Workload:
    """Chat-shaped messages: a user message, then the agent's reply with usage, per exchange."""

    def __init__(self, seed: int = 7) -> None:
        self.rng = random.Random(seed)
        self.conversations = [str(uuid.uuid4()) for _ in range(CONVERSATIONS)]
        self.offsets = dict.fromkeys(self.conversations, 0)
        self.last_user_msg: dict[str, str] = {}
        self.clock = datetime.now(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)

    def take(self, count: int) -> list[Message]:
        out: list[Message] = []
        for _ in range(count):
            cid = self.rng.choice(self.conversations)
            self.offsets[cid] += 1
            offset = self.offsets[cid]
            self.clock += timedelta(milliseconds=1)
            at = format_timestamp(self.clock)
            if offset % 2 == 1:
                mid = str(uuid.uuid4())
                self.last_user_msg[cid] = mid
                out.append(
                    Message(
                        id=mid,
                        conversation_id=cid,
                        offset=offset,
                        role="user",
                        text="how do I " + "x" * self.rng.randint(20, 160) + "?",
                        created_at=at,
                        user_id=f"user-{hash(cid) % 5000}",
                        client_msg_id=uuid.uuid4().hex,
                    )
                )
            else:
                out.append(
                    Message(
                        id=str(uuid.uuid4()),
                        conversation_id=cid,
                        offset=offset,
                        role="assistant",
                        text="You said: " + "y" * self.rng.randint(50, 400),
                        created_at=at,
                        agent_id="general",
                        finish_reason="stop",
                        usage=Usage(self.rng.randint(10, 500), self.rng.randint(10, 500)),
                        model="echo-1",
                        reply_to=self.last_user_msg.get(cid),
                    )
                )
        return out


def batches(messages: Sequence[Message], size: int) -> list[list[Message]]:
    return [list(messages[i : i + size]) for i in range(0, len(messages), size)]


async def reset(conn: Any) -> None:
    await conn.execute("TRUNCATE messages, usage")
    await conn.execute("UPDATE conversations SET updated_at = created_at")
    await conn.execute("UPDATE conversation_members SET updated_at = '2000-01-01'")
    # Every scenario starts from tables without the dead rows of the ones before it (the
    # server's autovacuum keeps them so; a bench this fast outruns it).
    await conn.execute("VACUUM ANALYZE messages, conversations, conversation_members, usage")
    await conn.execute("CHECKPOINT")


async def timed(rows: int, run: Callable[[], Awaitable[Any]]) -> float:
    started = time.perf_counter()
    await run()
    return rows / (time.perf_counter() - started)


async def bench(rows: int, single_rows: int, rounds: int) -> dict[str, Any]:
    server = PostgresServer(settings={"fsync": "on", "full_page_writes": "on"})
    try:
        server.start()
        dsn = server.create_database("persist_bench")
        store = PostgresStore(dsn, migrate=True, pool_min=2, pool_max=4, copy_threshold=1)
        arrays = PostgresStore(dsn, pool_min=2, pool_max=2, copy_threshold=1 << 30)
        await store.start()
        await arrays.start()
        conn = await asyncpg.connect(dsn, server_settings={"jit": "off"})
        try:
            return await _scenarios(store, arrays, conn, rows, single_rows, rounds)
        finally:
            await conn.close()
            await arrays.close()
            await store.close()
    finally:
        server.close()


async def _scenarios(
    store: PostgresStore, arrays: PostgresStore, conn: Any, rows: int, single_rows: int, rounds: int
) -> dict[str, Any]:
    work = Workload()
    now = format_timestamp(datetime.now(UTC) - timedelta(days=400))
    for cid in work.conversations:
        await store.create_conversation(
            Conversation(cid, "general", "bench", f"user-{hash(cid) % 5000}", (), now, now)
        )
    default = PostgresStore(store.dsn, pool_min=2, pool_max=4)  # as the server makes it
    await default.start()
    try:
        return await _measure(store, arrays, default, conn, work, rows, single_rows, rounds)
    finally:
        await default.close()


async def _copy_all(conn: Any, parts: Sequence[list[tuple[Any, ...]]]) -> None:
    for part in parts:
        await conn.copy_records_to_table("messages", records=part, columns=_RAW_COLUMNS)


def _arrival_order(messages: list[Message]) -> list[tuple[Any, ...]]:
    by_key = {(row[0], row[1]): row for row in Batch(messages).rows}
    return [by_key[(m.conversation_id, m.offset)] for m in messages]


async def _write_all(target: PostgresStore, parts: Sequence[list[Message]]) -> None:
    for part in parts:
        await target.write_messages(part)


async def _stage_all(target: PostgresStore, parts: Sequence[list[Message]]) -> None:
    """The careful path on every batch: staging table + INSERT ... ON CONFLICT DO NOTHING."""
    for part in parts:
        batch = Batch(part)
        async with target._primary.acquire() as conn, conn.transaction():
            await write_staged(conn, batch)


async def _two(run: Callable[[Sequence[list[Message]]], Awaitable[None]], parts: list[Any]) -> None:
    await asyncio.gather(run(parts[0::2]), run(parts[1::2]))


async def _full_outbox(messages: list[Message]) -> MemoryOutbox:
    outbox = MemoryOutbox(max_entries=len(messages) + 1)
    for m in messages:
        await outbox.add(m)
    return outbox


class PartStore:
    """The store's first attempt at a big batch with parts left out, to price each part.

    Rows, sort, authors and transactions as ``bump_then_write_direct`` does them; ``bump``
    and ``charge`` say which of the upkeep statements run beside the COPY.
    """

    def __init__(self, store: PostgresStore, *, bump: bool, charge: bool) -> None:
        self.store, self.bump, self.charge = store, bump, charge
        self.authors = RecentAuthors()

    async def write_messages(self, messages: Sequence[Message]) -> int:
        batch = Batch(messages, self.authors)
        async with self.store._primary.acquire() as conn:
            if self.bump:
                async with conn.transaction():
                    await conn.execute(BUMP_SETTINGS)
                    await conn.fetchval(BUMP, *batch.bump_args())
            async with conn.transaction():
                await conn.execute(WRITE_SETTINGS)
                await conn.copy_records_to_table(
                    "messages", records=batch.rows, columns=_RAW_COLUMNS
                )
                if self.charge:
                    await conn.fetchval(CHARGE, *batch.charge_args())
        self.authors.remember(batch.authors)
        return len(batch)


async def _end_to_end(store: Any, outbox: MemoryOutbox, writers: int) -> None:
    pool = [BatchWriter(outbox, store, max_batch=BATCH) for _ in range(writers)]
    for writer in pool:
        writer.start()
    # Draining stops: each returns once the outbox is empty and its last batch committed.
    await asyncio.gather(*(writer.stop(drain=True, timeout_s=600) for writer in pool))


async def _measure(
    store: PostgresStore,
    arrays: PostgresStore,
    default: PostgresStore,
    conn: Any,
    work: Workload,
    rows: int,
    single_rows: int,
    rounds: int,
) -> dict[str, Any]:
    runs: dict[str, list[float]] = {}
    wal_per_row: dict[str, list[float]] = {}

    async def scenario(
        name: str, count: int, run: Callable[[], Awaitable[Any]], fresh: bool = True
    ) -> None:
        if fresh:
            await reset(conn)
        lsn = await conn.fetchval("SELECT pg_current_wal_lsn()")
        rate = await timed(count, run)
        wal = await conn.fetchval("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1)", lsn)
        runs.setdefault(name, []).append(rate)
        wal_per_row.setdefault(name, []).append(float(wal) / count)
        print(
            f"  {name:<48} {rate:>10,.0f} rows/s {float(wal) / count:>7,.0f} WAL B/row", flush=True
        )
        if name not in (RAW, RAW_ARRIVAL):
            stored = await conn.fetchval("SELECT count(*) FROM messages")
            assert stored == count, f"{name}: {stored} of {count} stored"

    def parts() -> list[list[Message]]:
        return batches(work.take(rows), BATCH)

    for round_no in range(1, rounds + 1):
        print(f" round {round_no}/{rounds}")
        # The stream's own 10,000-row batches, each sorted by key as the store sorts it: the
        # best COPY of the rows the pipeline gets. (Sorting across batches, which no writer of
        # a live stream can do, made this ceiling ~25% higher: each batch then touched 1/8 of
        # the conversations' index pages.)
        raw = [Batch(part).rows for part in parts()]
        await scenario(RAW, rows, lambda r=raw: _copy_all(conn, r))
        stream = [_arrival_order(part) for part in parts()]
        await scenario(RAW_ARRIVAL, rows, lambda r=stream: _copy_all(conn, r))
        data = parts()
        await scenario(DIRECT_1, rows, lambda d=data: _write_all(store, d))
        if round_no == 1:
            await scenario(REPLAY, rows, lambda d=data: _write_all(store, d), fresh=False)
        data = parts()
        await scenario(DIRECT_2, rows, lambda d=data: _two(lambda p: _write_all(store, p), d))
        data = parts()
        await scenario(STAGE_1, rows, lambda d=data: _stage_all(store, d))
        data = parts()
        await scenario(STAGE_2, rows, lambda d=data: _two(lambda p: _stage_all(store, p), d))
        data = parts()
        await scenario(UNNEST, rows, lambda d=data: _write_all(arrays, d))
        for writers, name in ((1, E2E_1), (2, E2E_2)):
            # Filled before the clock starts: the figure is from the first read on.
            outbox = await _full_outbox(work.take(rows))
            await scenario(name, rows, lambda o=outbox, w=writers: _end_to_end(default, o, w))
        for name, bump, charge, unindexed in PARTS:
            outbox = await _full_outbox(work.take(rows))
            part = PartStore(default, bump=bump, charge=charge)
            if unindexed:  # the floor of any bump: every members' update can be HOT
                await conn.execute("DROP INDEX members_by_user")
            try:
                await scenario(name, rows, lambda o=outbox, p=part: _end_to_end(p, o, 2))
            finally:
                if unindexed:
                    await conn.execute(MEMBERS_BY_USER)

    # One INSERT per message, autocommit: the naive writer.
    singles = Batch(work.take(single_rows)).rows
    quoted = ", ".join(f'"{c}"' for c in _RAW_COLUMNS)
    insert_one = (
        f"INSERT INTO messages ({quoted}) "
        "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15) "
        "ON CONFLICT DO NOTHING"
    )

    async def one_by_one() -> None:
        for row in singles:
            await conn.execute(insert_one, *row)

    await scenario(SINGLE, len(singles), one_by_one)

    # Small batches: where unnest and COPY cross over (the store's copy_threshold).
    small: dict[str, dict[str, float]] = {}
    for size in (1, 10, 100, 500, 1000, 2000, 5000):
        count = min(rows, max(300, size * 20))
        part = batches(work.take(count), size)
        small[str(size)] = {}
        for label, target in (("unnest", arrays), ("copy", store)):
            await reset(conn)
            small[str(size)][label] = await timed(
                count, lambda target=target, part=part: _write_all(target, part)
            )
        print(
            f"  batches of {size:>5}: unnest {small[str(size)]['unnest']:>9,.0f}  "
            f"copy {small[str(size)]['copy']:>9,.0f} rows/s",
            flush=True,
        )
    ratios = {
        name: statistics.median(e / r for e, r in zip(runs[name], runs[RAW], strict=False))
        for name in (E2E_1, E2E_2, *(part[0] for part in PARTS))
    }
    version = await conn.fetchval("SHOW server_version")
    return {
        "rows_per_s": {name: statistics.median(rates) for name, rates in runs.items()},
        "best_rows_per_s": {name: max(rates) for name, rates in runs.items()},
        "runs_rows_per_s": runs,
        "end_to_end_over_raw_copy": ratios,
        "small_batches_rows_per_s": small,
        "wal_bytes_per_row": {name: statistics.median(b) for name, b in wal_per_row.items()},
        "breakdown_ms_per_10k_batch": await _breakdown(store, conn, work),
        "upkeep_forms_ms_per_10k_batch": await _upkeep_forms(conn, work),
        "server_version": version,
    }


# Other forms of the upkeep, priced beside the store's (``_upkeep_forms``); both lose the one
# lock order the store's forms take (see storage/store/pg_write.py), so two writers can deadlock.
PLAIN_BUMP = """
WITH newest AS (
    SELECT * FROM unnest($1::text[], $2::timestamptz[]) AS n(conversation_id, at)
), bump AS (
    UPDATE conversations c SET updated_at = n.at FROM newest n
    WHERE c.id = n.conversation_id AND c.updated_at < n.at
), bump_members AS (
    UPDATE conversation_members m SET updated_at = n.at FROM newest n
    WHERE m.conversation_id = n.conversation_id AND m.updated_at < n.at
)
SELECT 1
"""
UPDATE_THEN_INSERT_CHARGE = """
WITH r AS (
    SELECT * FROM unnest($1::text[], $2::date[], $3::bigint[], $4::bigint[]) AS r(who, day, i, o)
), updated AS (
    UPDATE usage u SET input_tokens = u.input_tokens + r.i, output_tokens = u.output_tokens + r.o
    FROM r WHERE u.user_id = r.who AND u.day = r.day
    RETURNING u.user_id, u.day
)
INSERT INTO usage AS u (user_id, day, input_tokens, output_tokens)
SELECT who, day, i, o FROM r
WHERE NOT EXISTS (SELECT 1 FROM updated d WHERE d.user_id = r.who AND d.day = r.day)
ON CONFLICT (user_id, day) DO UPDATE SET
    input_tokens = u.input_tokens + EXCLUDED.input_tokens,
    output_tokens = u.output_tokens + EXCLUDED.output_tokens
"""


async def _upkeep_forms(conn: Any, work: Workload) -> dict[str, float]:
    """The upkeep statements alone, the store's form beside a cheaper-looking one (median of 5).

    Every author is known (as the writer's cache mostly makes it), so both charges do the same
    work: an update of each user's daily row.
    """
    forms = (
        ("bump (store: locked in id order, then updated)", BUMP, BUMP_SETTINGS),
        ("bump, plain UPDATE ... FROM (no lock order)", PLAIN_BUMP, BUMP_SETTINGS),
        ("charge (store: INSERT ... ON CONFLICT DO UPDATE)", CHARGE, WRITE_SETTINGS),
        ("charge, UPDATE then INSERT the missing (no lock order)", UPDATE_THEN_INSERT_CHARGE,
         WRITE_SETTINGS),
    )  # fmt: skip
    known: dict[str, str] = {}
    times: dict[str, list[float]] = {}
    await reset(conn)
    for _ in range(5):
        for name, sql, settings in forms:
            batch = Batch(work.take(BATCH), known)
            known.update(batch.authors)
            if sql is PLAIN_BUMP or sql is BUMP:
                args = batch.bump_args()
            else:
                args = batch.charge_args()
                if sql is UPDATE_THEN_INSERT_CHARGE:
                    args = [args[0], args[3], args[4], args[5]]
            started = time.perf_counter()
            async with conn.transaction():
                await conn.execute(settings)
                await conn.fetchval(sql, *args)
            times.setdefault(name, []).append((time.perf_counter() - started) * 1000)
    out = {name: round(statistics.median(ms), 1) for name, ms in times.items()}
    for name, ms in out.items():
        print(f"  {name:<56} {ms:>7.1f} ms / 10k rows")
    return out


async def _breakdown(store: PostgresStore, conn: Any, work: Workload) -> dict[str, float]:
    """Where the time of one 10,000-row first attempt goes (median of 5 batches)."""
    parts: dict[str, list[float]] = {}

    def lap(name: str, started: float) -> float:
        now = time.perf_counter()
        parts.setdefault(name, []).append((now - started) * 1000)
        return now

    await reset(conn)
    for _ in range(5):
        messages = work.take(BATCH)
        t = time.perf_counter()
        batch = Batch(messages)
        t = lap("python: rows from messages", t)
        bump, charge = batch.bump_args(), batch.charge_args()
        t = lap("python: upkeep arguments", t)
        async with store._primary.acquire() as c:
            async with c.transaction():
                await c.execute(BUMP_SETTINGS)
                await c.fetchval(BUMP, *bump)
            t = lap("bump: updated_at of conversations, members", t)
            async with c.transaction():
                await c.execute(WRITE_SETTINGS)
                t = lap("BEGIN + SET LOCAL", t)
                await c.copy_records_to_table("messages", records=batch.rows, columns=_RAW_COLUMNS)
                t = lap("COPY into messages", t)
                await c.fetchval(CHARGE, *charge)
                t = lap("charge: usage", t)
            lap("COMMIT", t)
    out = {name: round(statistics.median(times), 1) for name, times in parts.items()}
    for name, ms in out.items():
        print(f"  {name:<48} {ms:>7.1f} ms / 10k rows")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=80_000, help="rows per scenario and round")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds")
    parser.add_argument("--single-rows", type=int, default=3_000, help="rows, one INSERT each")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()
    print(
        f"persist bench: {args.rows:,} rows per scenario x {args.rounds} rounds, fsync on, "
        f"{os.cpu_count()} cores"
    )
    started = time.perf_counter()
    found = asyncio.run(bench(args.rows, args.single_rows, args.rounds))
    rates, best = found["rows_per_s"], found["best_rows_per_s"]
    print()
    print(f"{'scenario':<52} {'median':>9} {'of raw':>7} {'best':>9} {'of raw':>7}")
    for name, rate in rates.items():
        print(
            f"{name:<52} {rate:>9,.0f} {rate / rates[RAW]:>7.0%} "
            f"{best[name]:>9,.0f} {best[name] / best[RAW]:>7.0%}"
        )
    for name, ratio in found["end_to_end_over_raw_copy"].items():
        print(f"{name}: {ratio:.0%} of raw COPY (median of per-round ratios; goal >= 60%)")
    report = {
        "bench": "persist",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "rows_per_scenario": args.rows,
        "rounds": args.rounds,
        "batch": BATCH,
        "fsync": "on",
        "cpus": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
        "python": platform.python_version(),
        "asyncpg": asyncpg.__version__,
        "postgres": found.pop("server_version"),
        "seconds": round(time.perf_counter() - started, 1),
        **found,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"persist-{datetime.now(UTC):%Y-%m-%d}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {path} ({report['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
