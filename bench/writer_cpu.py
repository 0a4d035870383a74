"""CPU per message of the batch writer's path, in production's shape, beside raw COPY.

    .venv/bin/python bench/writer_cpu.py [--batch 300] [--batches 100] [--rounds 3] [--out DIR]

Every message a production instance accepts is read back from the Redis outbox and written
to Postgres by a batch writer: under the fan-out's 4-member load that path was ~9% of an
instance's CPU. This measures it alone, in this process, with a throwaway Redis and Postgres
(fsync on), in interleaved rounds (median reported):

- **outbox read + ack**: ``RedisOutbox.read`` of a batch added beforehand, then its ``ack``
  (XACK + XDEL), through the server's tick-pipelined client: this process's CPU per message,
  and Redis's;
- **store write**: ``PostgresStore.write_messages`` of a small batch (``--batch``, below the
  COPY threshold: one ``unnest`` of an array of rows) and of a big one (twice the threshold:
  the bump, then COPY): this process's CPU per row, and the Postgres backend's;
- **raw COPY** of the same rows straight into ``messages`` (no upkeep, no dedup): the floor
  a store write is measured against.

Writes ``bench/results/writer-cpu.json``. About a minute.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    base_args,
    cpu_of,
    git_commit,
    log,
    machine,
    postgres_server,
    redis_pid,
    redis_server,
    seed_conversations,
    write_result,
)
from chatserver.redis_ticks import TickPipelinedRedis
from protocol import Message
from storage.outbox.redis import RedisOutbox
from storage.store.pg_write import COPY_THRESHOLD, Batch
from storage.store.postgres import PostgresStore
from storage.store.schema import NAMES

_USER = "writer-bench"
_T = TypeVar("_T")


class Messages:
    """User messages of one conversation, offsets counting up across every batch made."""

    def __init__(self, conversation_id: str) -> None:
        self.conversation_id = conversation_id
        self.offset = 0

    def batch(self, size: int) -> list[Message]:
        now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        out = []
        for _ in range(size):
            self.offset += 1
            out.append(
                Message(
                    id=str(uuid.uuid4()),
                    conversation_id=self.conversation_id,
                    offset=self.offset,
                    role="user",
                    text="a question of about the usual length, asked in the bench",
                    created_at=now,
                    user_id=_USER,
                    client_msg_id=str(uuid.uuid4()),
                )
            )
        return out


async def _measured(
    batches: list[_T], step: Callable[[_T], Awaitable[int]], other: Callable[[], float]
) -> dict[str, float]:
    """This process's and the other's CPU µs per item over ``step`` of every batch (each
    call returns how many items it did)."""
    items, here, there = 0, time.process_time(), other()
    for batch in batches:
        items += await step(batch)
    return {
        "client_us": (time.process_time() - here) * 1e6 / items,
        "server_us": (other() - there) * 1e6 / items,
    }


async def _round(redis_url: str, dsn: str, conversation_id: str, args: Any) -> dict[str, Any]:
    messages = Messages(conversation_id)
    out: dict[str, Any] = {}

    client = TickPipelinedRedis.from_url(redis_url)
    outbox = RedisOutbox(client, consumer="bench")
    redis_cpu = _cpu_reader([args.redis_pid])

    # Only the read and the ack are counted: the adds are the append's work, not the writer's.
    items, here, there = 0, 0.0, 0.0
    for _ in range(args.batches):
        await asyncio.gather(*(outbox.add(m) for m in messages.batch(args.batch)))
        started_here, started_there = time.process_time(), redis_cpu()
        got = await outbox.read(args.batch, 1.0)
        await outbox.ack([entry.entry_id for entry in got])
        here += time.process_time() - started_here
        there += redis_cpu() - started_there
        items += len(got)
    out["outbox read + ack"] = {"client_us": here * 1e6 / items, "server_us": there * 1e6 / items}
    await outbox.close()
    await client.aclose()

    store = PostgresStore(dsn, pool_min=1, pool_max=1)
    await store.start()
    try:
        async with store._primary.acquire() as conn:
            backend = await conn.fetchval("SELECT pg_backend_pid()")
        pg_cpu = _cpu_reader([backend])
        for label, size in (
            (f"store write, {args.batch} rows (unnest of rows)", args.batch),
            (f"store write, {2 * COPY_THRESHOLD} rows (bump, then COPY)", 2 * COPY_THRESHOLD),
        ):
            steps = max(1, args.batch * args.batches // size)
            batches = [messages.batch(size) for _ in range(steps)]
            out[label] = await _measured(batches, store.write_messages, pg_cpu)

        async def copy(rows: list[tuple[Any, ...]]) -> int:
            async with store._primary.acquire() as conn:
                await conn.copy_records_to_table("messages", records=rows, columns=NAMES)
            return len(rows)

        rows = [Batch(messages.batch(args.batch)).rows for _ in range(args.batches)]
        out[f"raw COPY, {args.batch} rows (the floor)"] = await _measured(rows, copy, pg_cpu)
    finally:
        await store.close()
    return out


def _cpu_reader(pids: list[int]) -> Callable[[], float]:
    def read() -> float:
        return sum(cpu_of(pids).values())

    return read


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=300, help="messages per outbox batch")
    parser.add_argument("--batches", type=int, default=100, help="batches per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="10 batches, once")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.quick:
        args.batches, args.rounds = 10, 1
    rounds: list[dict[str, Any]] = []
    with redis_server() as redis, postgres_server() as postgres:
        args.redis_pid = redis_pid(redis)
        dsn = postgres.dsn_for("chat")
        conversation_id = str(uuid.uuid4())
        seed_conversations(dsn, [{"id": conversation_id, "members": [_USER]}])
        for index in range(args.rounds):
            log(f"writer cpu: round {index + 1} of {args.rounds}")
            rounds.append(asyncio.run(_round(redis.url, dsn, conversation_id, args)))
    figures = {
        label: {
            side: round(statistics.median(r[label][side] for r in rounds), 2)
            for side in ("client_us", "server_us")
        }
        for label in rounds[0]
    }
    rows = [
        f"| {label} | {f['client_us']:.2f} µs | {f['server_us']:.2f} µs |"
        for label, f in figures.items()
    ]
    markdown = "\n".join(
        [
            f"**The batch writer's path, CPU per message** (median of {args.rounds} rounds, "
            f"{args.batches} batches of {args.batch} each):",
            "",
            "| step | this process | Redis or the Postgres backend |",
            "|---|---|---|",
            *rows,
        ]
    )
    data: dict[str, Any] = {
        "scenario": "writer-cpu",
        **base_args(args.quick),
        "machine": machine(),
        "git_commit": git_commit(),
        "settings": {"batch": args.batch, "batches": args.batches, "rounds": args.rounds},
        "figures": figures,
        "rounds": rounds,
        "markdown": markdown,
    }
    write_result("writer-cpu", data, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
