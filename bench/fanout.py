"""Fan-out: one conversation of 500 members across 2 instances, beside the peers, in one run.

    .venv/bin/python bench/fanout.py [--members 500] [--seconds 15] [--quick]

Targets, each started fresh on one throwaway Redis and driven by the same harness
(``chatserver loadtest``, 2 worker processes, members alternating between the 2 instances):

- chatserver: 2 instances on Redis and Postgres (``--redis-url``, ``--database-url``), the
  production shape, the conversation seeded in Postgres (REST caps members at 100), its agent
  parked (see bench/common.py) so that only the message fan-out runs, as on the peers.
  Postgres's CPU is reported apart, as Redis's is;
- bare aiohttp + Redis pub/sub, 2 processes (bench/peers/bare.py);
- python-socketio + AsyncRedisManager, 2 processes (bench/peers/sio.py);
- bare aiohttp alone, 1 process (flat out only): the classic one-process floor.

Two loads per target:

- ``latency``: 20 messages/s in all, every member a sender (at most 4 in flight each);
  delivery latency = receive time - send time, over every delivery;
- ``flat out``: 16 senders keep 8 messages each in flight (a message leaves a sender's window
  when every member, in both worker processes, has it): deliveries/s, and the server's CPU per
  delivery (CPU seconds of the server processes, from /proc, ÷ deliveries; Redis apart);
- for chatserver and bare + Redis, flat out again at 50 and at 4 members: server CPU per
  message = a + b x members, fitted through the three sizes (issue 18's split).

Writes ``bench/results/fanout.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    PARKED_AGENT,
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
    seed_conversations,
    slim,
    write_listing,
    write_result,
)
from bench.fanout_report import goals, markdown
from chatload import redisstat

PHASES = ("latency", "flatout", "split", "small")
# More flat-out loads, to split server CPU into per message + per delivery (a line fitted
# through the three sizes). The small one is the product's own shape (a user, the agent and
# a few members): its cost is nearly all per message, so the fit's intercept is measured
# there rather than extrapolated from 50 members, where a peer paying ~10 µs per delivery
# moved it by a hundred µs from run to run.
SPLIT_MEMBERS = 50
SMALL_MEMBERS = 4
# The per-connection frame budget (200/s, burst 400) is abuse protection, not what this
# measures, and the peers have none: a flat-out sender in a small conversation passes it
# (--quick: ~600 sends/s each), gets `rate_limited`, and is closed 1008 with its deliveries.
FANOUT_ENV = {**PARKED_AGENT, "CHAT_FRAMES_PER_SECOND": "1000000"}


@contextlib.contextmanager
def target(
    name: str, redis_url: str, members: int
) -> Iterator[tuple[list[str], list[int], Any, Callable[[], list[int]] | None]]:
    """(urls, server pids, per-phase extra harness settings, Postgres's pids) of a target."""
    if name == "chatserver":
        workdir = Path(tempfile.mkdtemp(prefix="chatserver-bench-fanout-"))
        users = [f"fan-{i}" for i in range(members)]
        convs = {ph: [{"id": str(uuid.uuid4()), "members": users}] for ph in PHASES}
        convs["split"][0]["members"] = users[:SPLIT_MEMBERS]
        convs["small"][0]["members"] = users[:SMALL_MEMBERS]
        files = {ph: write_listing(workdir / f"{ph}.json", c) for ph, c in convs.items()}
        with contextlib.ExitStack() as cleanup:
            cleanup.callback(shutil.rmtree, workdir, True)
            postgres = cleanup.enter_context(postgres_server())
            dsn = postgres.dsn_for("chat")
            seed_conversations(dsn, [c for listing in convs.values() for c in listing])
            servers = cleanup.enter_context(
                chatservers(2, redis_url=redis_url, env=FANOUT_ENV, args=["--database-url", dsn])
            )
            yield (
                [s.url for s in servers],
                [pid_of(s) for s in servers],
                {phase: {"conversations_file": str(f)} for phase, f in files.items()},
                lambda: postgres_pids(postgres),
            )
        return
    kind, count, use_redis = {
        "bare_redis": ("bare", 2, True),
        "socketio_redis": ("sio", 2, True),
        "bare_single": ("bare", 1, False),
    }[name]
    dialect = "socketio" if kind == "sio" else "peer"
    with peers(kind, count, redis_url if use_redis else None) as started:
        yield (
            [p.url for p in started],
            [p.pid for p in started],
            {phase: {"dialect": dialect} for phase in PHASES},
            None,
        )


def run_target(name: str, redis: Any, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with target(name, redis.url, args.members) as (urls, pids, extra, pg_pids):
        common = {
            "urls": urls,
            "clients": args.members,
            "members": args.members,
            "ramp_s": args.ramp,
            "procs": 2,
            "server_pids": pids,
            "aux_pids": [redis_pid(redis)] if len(urls) > 1 else [],
            "redis_urls": [redis.url] if len(urls) > 1 else [],
            "drain_timeout_s": args.drain,
            "max_loss": 0,
        }

        def run(**fields: Any) -> dict[str, Any]:
            """The load, with what Postgres spent over it (its backends come and go)."""
            before = cpu_of(pg_pids()) if pg_pids is not None else None
            report = load(**fields)
            if before is not None and pg_pids is not None:
                report["postgres_cpu_s"] = cpu_grown(before, cpu_of(pg_pids()))
            return report

        if name != "bare_single":
            out["latency"] = run(
                label=f"{name} latency",
                mode="chat",
                rate=args.rate,
                window=4,
                duration_s=args.seconds,
                **common,
                **extra["latency"],
            )
        out["flatout"] = run(
            label=f"{name} flat out",
            mode="chat",
            rate=0,
            senders=args.senders,
            window=args.window,
            duration_s=args.seconds,
            **common,
            **extra["flatout"],
        )
        if name in ("chatserver", "bare_redis") and args.split:
            for phase, size in (("split", SPLIT_MEMBERS), ("small", SMALL_MEMBERS)):
                small = min(size, max(2, args.members // 4))
                out[phase] = run(
                    label=f"{name} flat out, {small} members",
                    mode="chat",
                    rate=0,
                    senders=min(args.senders, small),
                    window=args.window,
                    duration_s=args.seconds,
                    **{**common, "clients": small, "members": small},
                    **extra[phase],
                )
    return out


def cost_split(*runs: dict[str, Any]) -> dict[str, Any]:
    """Server CPU per message = a + b x members, fitted (least squares) through flat-out
    loads of different sizes: a and b in µs."""
    points = []
    for run in runs:
        cpu = run["server"]["cpu_s"]
        messages = run["counts"]["acked"]
        members = run["config"]["members"]
        if cpu is None or not messages:
            return {}
        points.append((members, cpu * 1e6 / messages))
    points.sort()
    n = len(points)
    mean_m = sum(m for m, _ in points) / n
    mean_c = sum(c for _, c in points) / n
    spread = sum((m - mean_m) ** 2 for m, _ in points)
    if not spread:
        return {}
    per_delivery = sum((m - mean_m) * (c - mean_c) for m, c in points) / spread
    return {
        "per_message_us": round(mean_c - per_delivery * mean_m, 1),
        "per_delivery_us": round(per_delivery, 3),
        "points": [{"members": m, "cpu_us_per_message": round(c, 1)} for m, c in points],
    }


def figures(run: dict[str, Any]) -> dict[str, Any]:
    lat = run["latency_ms"]["delivery"]
    messages = run["counts"]["acked"]
    cpu, redis_cpu = run["server"]["cpu_s"], run["aux"]["cpu_s"]
    redis = redisstat.per(run.get("redis") or {}, messages)
    return {
        "delivery_p50_ms": lat["p50"],
        "delivery_p99_ms": lat["p99"],
        "delivery_max_ms": lat["max"],
        "ack_p99_ms": run["latency_ms"]["ack"]["p99"],
        "deliveries_per_s": run["rates_per_s"]["delivered"],
        "messages": run["counts"]["acked"],
        "server_cpu_s": run["server"]["cpu_s"],
        "server_cpu_us_per_delivery": run["server"]["cpu_us_per_delivery"],
        "redis_cpu_us_per_delivery": run["aux"]["cpu_us_per_delivery"],
        "server_cpu_pct": run["server"]["cpu_pct_of_one_core"],
        "harness_cpu_pct": run["harness"]["cpu_pct_of_one_core"],
        "harness_cpu_us_per_delivery": run["harness"]["cpu_us_per_frame"],
        "delivered": run["counts"]["delivered"],
        "expected": run["counts"]["expected_deliveries"],
        "lost": run["counts"]["lost"],
        "duplicated": run["counts"]["duplicated"],
        "reordered": run["counts"]["reordered"],
        "disconnects": run["connections"]["disconnects_during_run"],
        # Per message (acked), whatever the members: the server's CPU and what Redis did.
        "server_cpu_us_per_message": (
            round(cpu * 1e6 / messages, 1) if cpu is not None and messages else None
        ),
        "redis_cpu_us_per_message": (
            round(redis_cpu * 1e6 / messages, 1)
            if redis_cpu is not None and messages and run["aux"]["pids"]
            else None
        ),
        "redis_commands_per_message": redis.get("commands"),
        "redis_round_trips_per_message": redis.get("round_trips"),
        "redis_per_message": redis,
        "postgres_cpu_us_per_message": (
            round(run["postgres_cpu_s"] * 1e6 / messages, 1)
            if run.get("postgres_cpu_s") is not None and messages
            else None
        ),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=int, default=500)
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--senders", type=int, default=16)
    parser.add_argument("--window", type=int, default=8)
    parser.add_argument("--ramp", type=float, default=2.0)
    parser.add_argument("--drain", type=float, default=60.0)
    parser.add_argument("--targets", default="chatserver,bare_redis,socketio_redis,bare_single")
    parser.add_argument(
        "--no-split",
        dest="split",
        action="store_false",
        help=f"skip the {SPLIT_MEMBERS}- and {SMALL_MEMBERS}-member flat-out loads (the split)",
    )
    parser.add_argument("--quick", action="store_true", help="40 members, 2 s per load")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.quick:
        args.members, args.seconds, args.senders, args.window = 40, 1.0, 4, 4
        args.ramp, args.drain = 0.5, 15.0
    names = [n for n in args.targets.split(",") if n]
    runs: dict[str, dict[str, Any]] = {}
    log(f"fanout: {args.members} members, {args.rate}/s then flat out, {args.seconds}s each")
    with redis_server() as redis:
        for name in names:
            runs[name] = run_target(name, redis, args)
    table = {
        name: {phase: figures(run) for phase, run in phases.items()}
        for name, phases in runs.items()
    }
    split = {
        name: cost_split(phases["small"], phases["split"], phases["flatout"])
        for name, phases in runs.items()
        if "split" in phases
    }
    data: dict[str, Any] = {
        "scenario": "fanout",
        **base_args(args.quick),
        "machine": machine(),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "figures": table,
        "server_cpu_split": split,
    }
    data["git_commit"] = git_commit()
    data["goals"] = goals(table, split)
    data["markdown"] = markdown(table, data["goals"], split, args)
    data["runs"] = {
        name: {phase: slim(run) for phase, run in phases.items()} for name, phases in runs.items()
    }
    write_result("fanout", data, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
