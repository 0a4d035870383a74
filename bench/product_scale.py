"""The product's 12-month target on 2 instances, checking its SLOs.

    .venv/bin/python bench/product_scale.py [--users 10000] [--day-minutes 20] [--seconds 60]
                                            [--store postgres|sqlite] [--quick]

The scaling plan's 12-month figures: 10,000 connected users and 50,000 conversations a day,
with P50 < 200 ms, P95 < 500 ms, P99 < 1 s on requests and the first token of an answer well
under 2 s. Here the day is compressed: 50,000 conversations in ``--day-minutes`` minutes, of
which a window of ``--seconds`` is run (the rate, not the count, is what loads the server).

Set-up, all on 127.0.0.1: a throwaway Redis and Postgres (``--store sqlite``: one shared
SQLite file instead), 2 chatserver instances on them (migrated at start), the local model
(TTFT ``--ttft-ms``, 15 ms a word). The harness ramps up ``--users`` connections across both
instances; they stay connected. Messages go out at ``2 x conversations/s``, round-robin over
idle users: a user's first message of a conversation opens a new one (``POST
/api/conversations``, then ``join``), the second continues it; each gets a streamed reply.

Requests = REST create, join, send->ack; TTFT = send -> first delta. The harness exits 1 when
an SLO is missed or anything is lost; this script records the verdicts.
Writes ``bench/results/product-scale.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    base_args,
    chatservers,
    load,
    log,
    machine,
    pid_of,
    redis_pid,
    redis_server,
    slim,
    verdict,
    write_result,
)

CONVERSATIONS_PER_DAY = 50_000
TURNS = 2
SLO = {"p50": 200.0, "p95": 500.0, "p99": 1000.0, "ttft_p99": 2000.0}


@contextlib.contextmanager
def store(kind: str) -> Iterator[tuple[list[str], list[int], str]]:
    """(server args, pids to sample besides the servers, what it is)."""
    if kind == "sqlite":
        yield [], [], "one SQLite file shared by both instances"
        return
    from tests.services import PostgresServer

    postgres = PostgresServer(settings={"fsync": "on", "synchronous_commit": "on"})
    postgres.start()
    try:
        yield ["--database-url", postgres.dsn, "--migrate", "yes"], [], "Postgres (fsync on)"
    finally:
        postgres.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--day-minutes", type=float, default=20.0)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--ramp", type=float, default=25.0)
    parser.add_argument("--ttft-ms", type=int, default=300)
    parser.add_argument("--store", choices=("postgres", "sqlite"), default="postgres")
    parser.add_argument("--quick", action="store_true", help="200 users, 3 s")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.quick:
        args.users, args.seconds, args.ramp, args.ttft_ms = 200, 3.0, 1.0, 50
        args.store = "sqlite"
    conversations_per_s = CONVERSATIONS_PER_DAY / (args.day_minutes * 60)
    rate = conversations_per_s * TURNS
    log(
        f"product-scale: {args.users} users, {conversations_per_s:.1f} conversations/s "
        f"({rate:.1f} messages/s) for {args.seconds:g} s on {args.store}"
    )
    env = {"CHAT_LOCAL_TTFT_MS": str(args.ttft_ms), "CHAT_LOCAL_TOKEN_MS": "15"}
    with contextlib.ExitStack() as stack:
        redis = stack.enter_context(redis_server())
        store_args, _, store_name = stack.enter_context(store(args.store))
        servers = stack.enter_context(chatservers(2, redis_url=redis.url, env=env, args=store_args))
        report = load(
            label="product-scale",
            urls=[s.url for s in servers],
            mode="ai",
            clients=args.users,
            members=1,
            turns=TURNS,
            rate=rate,
            window=1,
            ramp_s=args.ramp,
            duration_s=args.seconds,
            text_bytes=48,
            procs=2,
            server_pids=[pid_of(s) for s in servers],
            aux_pids=[redis_pid(redis)],
            provider_ttft_ms=args.ttft_ms,
            provider_token_ms=15,
            drain_timeout_s=60,
            slo_p50_ms=SLO["p50"],
            slo_p95_ms=SLO["p95"],
            slo_p99_ms=SLO["p99"],
            slo_ttft_p99_ms=SLO["ttft_p99"],
            max_loss=0,
            max_errors=0,
        )
    latency = report["latency_ms"]
    counts = report["counts"]
    figures = {
        name: {q: latency[name][q] for q in ("count", "p50", "p95", "p99", "max")}
        for name in ("rest", "join", "ack", "ttft", "gap", "connect")
    }
    data: dict[str, Any] = {
        "scenario": "product-scale",
        **base_args(args.quick),
        "machine": machine(),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "store": store_name,
        "compression": {
            "conversations_per_s": round(conversations_per_s, 2),
            "messages_per_s": round(rate, 2),
            "day_in_minutes": args.day_minutes,
            "factor": round(24 * 60 / args.day_minutes, 1),
        },
        "figures": figures,
        "connected": report["connections"]["connected"],
        "conversations_created": counts["conversations_created"],
        "replies": counts["replies"],
        "defects": counts["defects"],
        "failures": counts["failures"],
        "server": report["server"],
        "harness": report["harness"],
        "slo": report["slo"],
    }
    ok = report["slo"]["ok"]
    rows = [
        f"| {name} | {f['count']} | {f['p50']} | {f['p95']} | {f['p99']} | {f['max']} |"
        for name, f in figures.items()
    ]
    missed = [
        f"{c['name']} {c['value']} > {c['limit']}" for c in report["slo"]["checks"] if not c["ok"]
    ]
    missed_text = " — missed: " + "; ".join(missed) if missed else ""
    data["markdown"] = "\n".join(
        [
            f"{report['connections']['connected']}/{args.users} users connected on 2 instances "
            f"({store_name}, Redis); {conversations_per_s:.1f} new conversations/s "
            f"({rate:.1f} messages/s, each answered: 50,000 conversations a day compressed "
            f"{data['compression']['factor']}x) for {args.seconds:g} s; "
            f"{counts['conversations_created']} conversations, "
            f"{counts['replies']['ended']} replies; lost+dup+reord {counts['defects']}, "
            f"failures {counts['failures']}; server CPU "
            f"{report['server']['cpu_pct_of_one_core']}% of a core (both instances), harness "
            f"{report['harness']['cpu_pct_of_one_core']}%.",
            "",
            "| ms | count | p50 | p95 | p99 | max |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
            f"SLOs (requests p50 < {SLO['p50']:g} ms, p95 < {SLO['p95']:g} ms, p99 < "
            f"{SLO['p99']:g} ms; TTFT p99 < {SLO['ttft_p99']:g} ms; nothing lost): "
            f"**{verdict(ok)}**{missed_text}",
        ]
    )
    data["run"] = slim(report)
    write_result("product-scale", data, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
