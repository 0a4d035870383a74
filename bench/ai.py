"""Streamed replies: 1,000 concurrent replies from the local provider at 15 ms per token.

    .venv/bin/python bench/ai.py [--concurrency 100,300,600,1000] [--seconds 12] [--quick]

One chatserver instance (embedded default) answers with the local provider (time to first
token ``--ttft-ms``, then one word every 15 ms). The harness keeps ``N`` replies streaming at
all times: N clients, each alone with the agent in its own conversation, send a message,
follow its reply to ``gen_end``, and send the next one at once (a closed loop, so N replies
are always running). Measured at the client:

- time to first token = first ``delta`` received - ``send`` written; *added* = that minus
  the provider's own TTFT;
- gap between deltas = arrival of delta n+1 - arrival of delta n; *added* = that minus the
  provider's pace (15 ms). The server coalesces words that piled up into one delta, so a
  late stream shows fewer, longer gaps.

Two comparators, each started in the same run:

- the provider itself: the same N streams pushed straight from ``LocalProvider.open()`` (its
  shared timer, as in the server) in one process (uvloop, no server, no network): what the
  timer alone adds at that concurrency on this machine;
- the floor of a server: ``bench/peers/bare.py --agent-token-ms``, a bare aiohttp server that
  answers each message from the same provider with one ``await ws.send_str()`` per delta and
  nothing else (no store, window, limits or metrics), driven by the same harness.

At its ``--production`` levels it also runs production mode (2 instances on Redis and
Postgres) and the python-socketio peer (docs/benchmarks.md); at the highest of them, where
issue 18's goals are read, production and then the embedded instance once more, and the
goals' CPU ratios pool both runs of each (``bench/ai_report.py``).

Writes ``bench/results/ai.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.ai_report import (
    GOAL_GAP_P99_MS,
    GOAL_TTFT_P50_MS,
    capacity_of,
    markdown,
    production_goals,
    under,
)
from bench.common import (
    base_args,
    chatservers,
    cpu_grown,
    cpu_of,
    git_commit,
    load,
    log,
    machine,
    peers,
    pid_of,
    postgres_pids,
    postgres_server,
    redis_pid,
    redis_server,
    slim,
    write_result,
)
from chatload import redisstat


async def _provider_alone(concurrency: int, seconds: float, ttft_ms: int, token_ms: int) -> Any:
    from chatload.stats import Histogram
    from chatserver.generation.local import LocalProvider
    from chatserver.generation.provider import Finish, ReplyRequest
    from protocol import Message

    provider = LocalProvider(ttft_ms, token_ms)
    ttft, gap = Histogram(), Histogram()
    history = (
        Message("m", "c", 1, "user", "~L" + "0" * 32 + " lorem ipsum dolor sit", "2026-01-01"),
    )
    request = ReplyRequest("general", "local", "", history, 0.7, 1024)
    deadline = time.monotonic() + seconds
    loop = asyncio.get_running_loop()
    finished = loop.create_future()
    running = 0

    class Sink:
        """One stream, pushed by the provider's shared timer as the server's are."""

        def __init__(self) -> None:
            self.started = self.last = time.monotonic_ns()
            self.first = True

        def chunk(self, text: str) -> None:
            now = time.monotonic_ns()
            if self.first:
                ttft.record_ns(now - self.started)
            else:
                gap.record_ns(now - self.last)
            self.first, self.last = False, now

        def finish(self, finish: Finish) -> None:
            nonlocal running
            if time.monotonic() < deadline:
                provider.open(request, Sink())  # the next reply at once: N always running
                return
            running -= 1
            if running == 0:
                finished.set_result(None)

    cpu = time.process_time()
    for _ in range(concurrency):
        running += 1
        provider.open(request, Sink())
    await finished
    return {
        "ttft_added": ttft.summary(ttft_ms),
        "gap_added": gap.summary(token_ms),
        "cpu_s": round(time.process_time() - cpu, 3),
    }


def provider_alone(concurrency: int, seconds: float, ttft_ms: int, token_ms: int) -> Any:
    """In a fresh process (uvloop, like the server), so nothing else shares its loop."""
    root = str(Path(__file__).resolve().parent.parent)
    call = f"_provider_alone({concurrency}, {seconds}, {ttft_ms}, {token_ms})"
    code = (
        f"import json, sys, uvloop; sys.path.insert(0, {root!r}); "
        f"from bench.ai import _provider_alone; print(json.dumps(uvloop.run({call})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", default="100,300,600,1000", help="comma-separated")
    parser.add_argument(
        "--production",
        default="100,300",
        help="levels (comma-separated) that also run production mode and the python-socketio "
        "peer; the goals are read at the highest ('' : none)",
    )
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument("--ttft-ms", type=int, default=200)
    parser.add_argument("--token-ms", type=int, default=15)
    parser.add_argument("--ramp", type=float, default=3.0)
    parser.add_argument(
        "--no-again",
        dest="again",
        action="store_false",
        help="at the goals' level, skip the second production and embedded runs (pooled)",
    )
    parser.add_argument(
        "--no-one-instance",
        dest="one_instance",
        action="store_false",
        help="at the goals' level, skip production mode on one instance (not a goal: it "
        "tells the Redis and Postgres path's cost from the load's split over two)",
    )
    parser.add_argument("--quick", action="store_true", help="20 replies for 2 s")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.quick:
        args.concurrency, args.production = "20", "20"
        args.seconds, args.ramp, args.ttft_ms = 2.0, 0.5, 50
    production = sorted({int(n) for n in args.production.split(",") if n})
    levels = sorted({int(n) for n in args.concurrency.split(",") if n} | set(production))
    env = {"CHAT_LOCAL_TTFT_MS": str(args.ttft_ms), "CHAT_LOCAL_TOKEN_MS": str(args.token_ms)}
    table: dict[str, Any] = {}
    runs: dict[str, Any] = {}
    log(
        f"ai: {levels} concurrent replies (production mode at {production or 'none'}), "
        f"TTFT {args.ttft_ms} ms, {args.token_ms} ms/token"
    )
    agent = ["--agent-ttft-ms", str(args.ttft_ms), "--agent-token-ms", str(args.token_ms)]
    with contextlib.ExitStack() as stack:
        redis = postgres = None
        if production:
            redis = stack.enter_context(redis_server())
            postgres = stack.enter_context(postgres_server())
        for n in levels:
            alone = provider_alone(n, args.seconds, args.ttft_ms, args.token_ms)
            report = _embedded(args, n, env)
            with peers("bare", 1, args=agent) as bare:
                floor = _drive(args, n, "peer", [bare[0].url], [bare[0].pid])
            runs[str(n)] = slim(report)
            runs[f"{n} bare"] = slim(floor)
            table[str(n)] = {
                **_figures(report),
                "provider_alone_ttft_added_p50_ms": alone["ttft_added"]["p50"],
                "provider_alone_gap_added_p99_ms": alone["gap_added"]["p99"],
                "provider_alone_cpu_s": alone["cpu_s"],
                "bare": _figures(floor),
            }
            if n not in production:
                continue
            assert redis is not None and postgres is not None
            on_redis = {"aux_pids": [redis_pid(redis)], "redis_urls": [redis.url]}
            prod, pg_cpu = _production(args, n, env, redis, postgres)
            with peers("sio", 2, redis.url, args=agent) as sio:
                peer = _drive(
                    args, n, "socketio", [p.url for p in sio], [p.pid for p in sio], **on_redis
                )
            runs[f"{n} production"] = slim(prod)
            runs[f"{n} socketio"] = slim(peer)
            table[str(n)]["production"] = _figures(prod, postgres_cpu_s=pg_cpu)
            table[str(n)]["socketio"] = _figures(peer)
            if n == max(production) and args.again:
                # The goal's ratio compares runs minutes apart on a shared machine: once more
                # in the opposite order (production, then embedded), so that a drift of the
                # machine's speed weighs on both alike; the goal reads the pooled figures.
                prod_again, pg_again = _production(args, n, env, redis, postgres)
                emb_again = _embedded(args, n, env)
                runs[f"{n} production again"] = slim(prod_again)
                runs[f"{n} again"] = slim(emb_again)
                table[str(n)]["again"] = {
                    "production": _figures(prod_again, postgres_cpu_s=pg_again),
                    "chatserver": _figures(emb_again),
                }
            if n == max(production) and args.one_instance:
                alone_prod, pg_alone = _production(args, n, env, redis, postgres, instances=1)
                runs[f"{n} production one instance"] = slim(alone_prod)
                table[str(n)]["one_instance"] = _figures(alone_prod, postgres_cpu_s=pg_alone)
    top = table[str(max(levels))]
    goals = {
        "ttft_added_p50": under(top["ttft_added_p50_ms"], GOAL_TTFT_P50_MS),
        "gap_added_p99": under(top["gap_added_p99_ms"], GOAL_GAP_P99_MS),
        "defects": {"value": top["defects"], "goal": "0", "met": top["defects"] == 0},
    }
    # The most concurrent replies at which both latency goals held, for each server.
    capacity: dict[str, Any] = {
        "chatserver": capacity_of({int(level): row for level, row in table.items()}),
        "bare_aiohttp": capacity_of({int(level): row["bare"] for level, row in table.items()}),
    }
    prod_goals: dict[str, Any] = {}
    if production:
        for name in ("production", "socketio"):
            capacity[name] = capacity_of(
                {int(level): row[name] for level, row in table.items() if name in row}
            )
        prod_goals = production_goals(table, production, capacity)
    lines = markdown(args, table, goals, capacity, production, prod_goals)
    write_result(
        "ai",
        {
            "scenario": "ai",
            **base_args(args.quick),
            "machine": machine(),
            "git_commit": git_commit(),
            "settings": {k: v for k, v in vars(args).items() if k != "out"},
            "figures": table,
            "goals": goals,
            "production_goals": prod_goals,
            "both_goals_met_up_to": capacity,
            "markdown": "\n".join(lines),
            "runs": runs,
        },
        args.out,
    )
    return 0


def _embedded(args: argparse.Namespace, n: int, env: dict[str, str]) -> Any:
    """The load on one embedded instance, started fresh."""
    with chatservers(1, env=env) as servers:
        return _drive(args, n, "chatserver", [servers[0].url], [pid_of(servers[0])])


def _production(
    args: argparse.Namespace,
    n: int,
    env: dict[str, str],
    redis: Any,
    postgres: Any,
    instances: int = 2,
) -> tuple[Any, float | None]:
    """The load on fresh instances (2: the goals' shape) on the run's Redis and Postgres; and
    what Postgres spent over it."""
    on_redis = {"aux_pids": [redis_pid(redis)], "redis_urls": [redis.url]}
    dsn = postgres.dsn_for("chat")
    started = chatservers(instances, redis_url=redis.url, env=env, args=["--database-url", dsn])
    with started as servers:
        pg_before = cpu_of(postgres_pids(postgres))  # the pools are open now
        prod = _drive(
            args, n, "chatserver", [s.url for s in servers],
            [pid_of(s) for s in servers], production=True, **on_redis,
        )  # fmt: skip
        return prod, cpu_grown(pg_before, cpu_of(postgres_pids(postgres)))


def _drive(
    args: argparse.Namespace,
    n: int,
    dialect: str,
    urls: list[str],
    pids: list[int],
    *,
    production: bool = False,
    **extra: Any,
) -> Any:
    name = "production" if production else ("" if dialect == "chatserver" else dialect)
    return load(
        label=f"ai {n} replies" + (f" ({name})" if name else ""),
        urls=urls,
        dialect=dialect,
        mode="ai",
        clients=n,
        members=1,
        rate=0,
        window=1,
        ramp_s=args.ramp,
        duration_s=args.seconds,
        text_bytes=48,
        procs=2,
        server_pids=pids,
        provider_ttft_ms=args.ttft_ms,
        provider_token_ms=args.token_ms,
        drain_timeout_s=60,
        max_loss=0,
        **extra,
    )


def _figures(report: Any, postgres_cpu_s: float | None = None) -> dict[str, Any]:
    latency = report["latency_ms"]
    server = report["server"]
    replies = report["counts"]["replies"]["ended"]
    window = report["rates_per_s"]["window_s"]
    out: dict[str, Any] = {
        "replies": replies,
        "replies_per_s": round(replies / window, 1) if window and replies else None,
        "deltas_per_s": report["rates_per_s"]["deltas"],
        # A late stream coalesces words into fewer deltas: per-reply counts move with this.
        "deltas_per_reply": (
            round(report["counts"]["deltas"]["delivered"] / replies, 1) if replies else None
        ),
        "ttft_added_p50_ms": latency.get("ttft_added", {}).get("p50"),
        "ttft_added_p99_ms": latency.get("ttft_added", {}).get("p99"),
        "gap_added_p50_ms": latency.get("gap_added", {}).get("p50"),
        "gap_added_p99_ms": latency.get("gap_added", {}).get("p99"),
        "ack_p99_ms": latency["ack"]["p99"],
        "defects": report["counts"]["defects"],
        "server_cpu_pct": server["cpu_pct_of_one_core"],
        "server_cpu_us_per_frame": server["cpu_us_per_delivery"],
        # Server CPU from the first send to the end (deltas included) over the replies.
        "server_cpu_us_per_reply": round(server["cpu_s"] * 1e6 / replies) if replies else None,
        "loop_thread_cpu_pct": server["loop_thread_cpu_pct"],
        "write_syscalls_per_reply": (
            round(server["write_syscalls"] / replies, 1)
            if replies and server["write_syscalls"] is not None
            else None
        ),
        "harness_cpu_pct": report["harness"]["cpu_pct_of_one_core"],
    }
    if report["aux"]["pids"]:  # redis-server, from /proc like the instances
        aux = report["aux"]["cpu_s"]
        out["redis_cpu_us_per_reply"] = round(aux * 1e6 / replies) if replies and aux else None
    if "redis" in report:
        out["redis"] = redisstat.per(report["redis"], replies)
        out["redis_total"] = report["redis"]
    if postgres_cpu_s is not None:
        out["postgres_cpu_s"] = postgres_cpu_s
        out["postgres_cpu_us_per_reply"] = (
            round(postgres_cpu_s * 1e6 / replies) if replies else None
        )
    return out


if __name__ == "__main__":
    sys.exit(main())
