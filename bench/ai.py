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
    ratio,
    redis_pid,
    redis_server,
    slim,
    verdict,
    write_result,
)
from chatload import redisstat

GOAL_TTFT_P50_MS = 5.0
GOAL_GAP_P99_MS = 10.0


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


GOAL_CPU_RATIO = 1.5  # instance CPU per reply, production ÷ embedded
GOAL_REDIS_COMMANDS = 30.0  # per reply
GOAL_REDIS_CPU_RATIO = 0.3  # Redis CPU per reply ÷ embedded instance CPU per reply
GOAL_PEER_RATIO = 3.0  # replies/s at equal latency ÷ the python-socketio peer
SERVERS = {
    "chatserver": "chatserver, embedded (1 instance)",
    "bare": "bare aiohttp (1 process)",
    "production": "chatserver, production (2 instances + Redis + Postgres)",
    "socketio": "python-socketio + AsyncRedisManager (2 processes, Open WebUI's shape)",
}


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
            with chatservers(1, env=env) as servers:
                report = _drive(args, n, "chatserver", [servers[0].url], [pid_of(servers[0])])
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
            dsn = postgres.dsn_for("chat")
            with chatservers(
                2, redis_url=redis.url, env=env, args=["--database-url", dsn]
            ) as servers:
                pg_before = cpu_of(postgres_pids(postgres))  # the pools are open now
                prod = _drive(
                    args, n, "chatserver", [s.url for s in servers],
                    [pid_of(s) for s in servers], production=True, **on_redis,
                )  # fmt: skip
                pg_cpu = cpu_grown(pg_before, cpu_of(postgres_pids(postgres)))
            with peers("sio", 2, redis.url, args=agent) as sio:
                peer = _drive(
                    args, n, "socketio", [p.url for p in sio], [p.pid for p in sio], **on_redis
                )
            runs[f"{n} production"] = slim(prod)
            runs[f"{n} socketio"] = slim(peer)
            table[str(n)]["production"] = _figures(prod, postgres_cpu_s=pg_cpu)
            table[str(n)]["socketio"] = _figures(peer)
    top = table[str(max(levels))]
    goals = {
        "ttft_added_p50": {
            "value": top["ttft_added_p50_ms"],
            "goal": f"< {GOAL_TTFT_P50_MS} ms",
            "met": _below(top["ttft_added_p50_ms"], GOAL_TTFT_P50_MS),
        },
        "gap_added_p99": {
            "value": top["gap_added_p99_ms"],
            "goal": f"< {GOAL_GAP_P99_MS} ms",
            "met": _below(top["gap_added_p99_ms"], GOAL_GAP_P99_MS),
        },
        "defects": {"value": top["defects"], "goal": "0", "met": top["defects"] == 0},
    }
    # The most concurrent replies at which both latency goals held, for each server.
    capacity: dict[str, Any] = {
        "chatserver": _capacity({int(level): row for level, row in table.items()}),
        "bare_aiohttp": _capacity({int(level): row["bare"] for level, row in table.items()}),
    }
    production_goals: dict[str, Any] = {}
    if production:
        for name in ("production", "socketio"):
            capacity[name] = _capacity(
                {int(level): row[name] for level, row in table.items() if name in row}
            )
        production_goals = _production_goals(table, production, capacity)
    lines = _markdown(args, table, goals, capacity, production, production_goals)
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
            "production_goals": production_goals,
            "both_goals_met_up_to": capacity,
            "markdown": "\n".join(lines),
            "runs": runs,
        },
        args.out,
    )
    return 0


def _production_goals(
    table: dict[str, Any], production: list[int], capacity: dict[str, Any]
) -> dict[str, Any]:
    """The issue's goals, as ratios within this run, at the highest production level."""
    level = max(production)
    row = table[str(level)]
    prod, peer = row["production"], row["socketio"]
    cpu_ratio = ratio(prod["server_cpu_us_per_reply"], row["server_cpu_us_per_reply"])
    redis_ratio = ratio(prod["redis_cpu_us_per_reply"], row["server_cpu_us_per_reply"])
    commands = prod["redis"].get("commands")
    defects = prod["defects"] + row["defects"]

    def rate_at(name: str) -> float | None:
        best = capacity.get(name)
        if best is None:
            return None
        f = table[str(best)] if name == "chatserver" else table[str(best)][name]
        return float(f["replies_per_s"]) if f["replies_per_s"] is not None else None

    ours, theirs = rate_at("production"), rate_at("socketio")
    if ours is not None and theirs is not None:
        peer_ratio: float | None = ratio(ours, theirs)
        peer_met: bool | None = peer_ratio is not None and peer_ratio >= GOAL_PEER_RATIO
    elif ours is not None:  # the peer held the latency goals at no level run, we did
        peer_ratio, peer_met = None, True
    elif theirs is not None:
        peer_ratio, peer_met = 0.0, False
    else:
        peer_ratio, peer_met = None, None
    return {
        "level": level,
        "instance_cpu_per_reply_vs_embedded": {
            "value": cpu_ratio,
            "goal": f"<= {GOAL_CPU_RATIO}x",
            "met": None if cpu_ratio is None else cpu_ratio <= GOAL_CPU_RATIO,
        },
        "redis_commands_per_reply": {
            "value": commands,
            "goal": f"<= {GOAL_REDIS_COMMANDS:g}",
            "met": None if commands is None else commands <= GOAL_REDIS_COMMANDS,
        },
        "redis_cpu_per_reply_vs_embedded_instance": {
            "value": redis_ratio,
            "goal": f"<= {GOAL_REDIS_CPU_RATIO}x",
            "met": None if redis_ratio is None else redis_ratio <= GOAL_REDIS_CPU_RATIO,
        },
        "production_ttft_added_p50": {
            "value": prod["ttft_added_p50_ms"],
            "goal": f"< {GOAL_TTFT_P50_MS} ms",
            "met": _below(prod["ttft_added_p50_ms"], GOAL_TTFT_P50_MS),
        },
        "production_gap_added_p99": {
            "value": prod["gap_added_p99_ms"],
            "goal": f"< {GOAL_GAP_P99_MS} ms",
            "met": _below(prod["gap_added_p99_ms"], GOAL_GAP_P99_MS),
        },
        "replies_per_s_at_equal_latency_vs_socketio": {
            "value": peer_ratio,
            "production_replies_per_s": ours,
            "socketio_replies_per_s": theirs,
            "goal": f">= {GOAL_PEER_RATIO:g}x",
            "met": peer_met,
        },
        # Not the goal's figure (that one is at equal latency): the same closed loop, same N.
        "replies_per_s_at_equal_concurrency_vs_socketio": ratio(
            prod["replies_per_s"], peer["replies_per_s"]
        ),
        "lost_duplicated_reordered": {
            "value": defects,
            "goal": "0",
            "met": defects == 0,
        },
        "socketio_defects": peer["defects"],
    }


def _markdown(
    args: argparse.Namespace,
    table: dict[str, Any],
    goals: dict[str, Any],
    capacity: dict[str, Any],
    production: list[int],
    production_goals: dict[str, Any],
) -> list[str]:
    levels = [int(level) for level in table]
    lines = [
        f"Local provider: TTFT {args.ttft_ms} ms, {args.token_ms} ms per token; "
        f"{args.seconds:g} s per load. Embedded: 1 instance, SQLite. Bare aiohttp: the same "
        "provider streamed with one `send_str` per delta, nothing stored (the floor). "
        "Production: 2 instances on one Redis and one Postgres (fsync on), clients split over "
        "both. python-socketio: 2 processes on the same Redis, every reply frame one `emit` to "
        "the conversation's room.",
        "",
        "| concurrent replies | server | replies done | replies/s | deltas/s | "
        "added TTFT p50 / p99 | added gap p50 / p99 | lost/dup | server CPU (its event-loop "
        "thread) | server CPU per reply | write syscalls per reply | harness CPU |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    short = {
        "chatserver": "chatserver",
        "bare": "bare aiohttp",
        "production": "chatserver production",
        "socketio": "python-socketio",
    }
    for level, row in table.items():
        for key in ("chatserver", "bare", "production", "socketio"):
            f = row if key == "chatserver" else row.get(key)
            if f is None:
                continue
            lines.append(
                f"| {level} | {short[key]} | {f['replies']} | {f['replies_per_s']} | "
                f"{f['deltas_per_s']} | "
                f"{f['ttft_added_p50_ms']} / {f['ttft_added_p99_ms']} ms | "
                f"{f['gap_added_p50_ms']} / {f['gap_added_p99_ms']} ms | {f['defects']} | "
                f"{f['server_cpu_pct']}% ({f['loop_thread_cpu_pct']}%) | "
                f"{f['server_cpu_us_per_reply']} µs | {f['write_syscalls_per_reply']} | "
                f"{f['harness_cpu_pct']}% |"
            )
        lines.append(
            f"| {level} | provider alone | | | | {row['provider_alone_ttft_added_p50_ms']} ms "
            f"(p50) | {row['provider_alone_gap_added_p99_ms']} ms (p99) | | | | | |"
        )
    lines.append("")
    for key, label in (
        ("ttft_added_p50", "added TTFT p50"),
        ("gap_added_p99", "added gap p99"),
        ("defects", "lost/duplicated deltas and replies"),
    ):
        g = goals[key]
        lines.append(
            f"- embedded, {label} at {max(levels)} replies: {g['value']} (goal {g['goal']}): "
            f"**{verdict(g['met'])}**"
        )
    held = ", ".join(
        f"{SERVERS[name if name != 'bare_aiohttp' else 'bare']}: {capacity[name] or 'none'}"
        for name in capacity
    )
    lines.append(f"- both latency goals held up to (of the levels run): {held}")
    if not production:
        return lines
    lines += [
        "",
        "**Per reply** (CPU from /proc over the run; Redis commands from the `INFO "
        "commandstats` delta, the calls inside Lua scripts included; round trips = Redis "
        "read events, `total_reads_processed`; Postgres CPU over the whole load, ramp "
        "included):",
        "",
        "| concurrent replies | server | deltas | instance CPU | Redis CPU | Redis commands | "
        "of which scripts | Redis round trips | Redis bytes in | Postgres CPU | added TTFT "
        "p50 | added gap p99 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for level in production:
        row = table[str(level)]
        for key in ("chatserver", "production", "socketio"):
            f = row if key == "chatserver" else row[key]
            r = f.get("redis") or {}
            pg = f.get("postgres_cpu_us_per_reply")
            lines.append(
                f"| {level} | {short[key]} | {f['deltas_per_reply']} | "
                f"{f['server_cpu_us_per_reply']} µs | "
                f"{_us(f.get('redis_cpu_us_per_reply'))} | {r.get('commands', '-')} | "
                f"{r.get('scripts', '-')} | {r.get('round_trips', '-')} | "
                f"{r.get('net_input_bytes', '-')} | {_us(pg)} | "
                f"{f['ttft_added_p50_ms']} ms | {f['gap_added_p99_ms']} ms |"
            )
    level = max(production)
    prod = table[str(level)]["production"].get("redis") or {}
    peer = table[str(level)]["socketio"].get("redis") or {}
    names = list(prod.get("by_command", {}))
    names += [n for n in peer.get("by_command", {}) if n not in names]
    lines += [
        "",
        f"Redis commands per reply by command at {level} replies:",
        "",
        "| command | chatserver production | python-socketio |",
        "|---|---|---|",
    ]
    for name in names:
        lines.append(
            f"| {name.upper()} | {prod.get('by_command', {}).get(name, '-')} | "
            f"{peer.get('by_command', {}).get(name, '-')} |"
        )
    g = production_goals
    rate = g["replies_per_s_at_equal_latency_vs_socketio"]
    prod_row, peer_row = table[str(level)]["production"], table[str(level)]["socketio"]
    lines += [
        "",
        f"Goals (issue 18), ratios within this run at {level} concurrent replies:",
        "",
        "| figure | value | goal | |",
        "|---|---|---|---|",
    ]
    for key, label in (
        ("instance_cpu_per_reply_vs_embedded", "instance CPU per reply, production ÷ embedded"),
        ("redis_commands_per_reply", "Redis commands per reply"),
        (
            "redis_cpu_per_reply_vs_embedded_instance",
            "Redis CPU per reply ÷ embedded instance CPU per reply",
        ),
        ("production_ttft_added_p50", "added TTFT p50, production"),
        ("production_gap_added_p99", "added gap p99, production"),
        (
            "replies_per_s_at_equal_latency_vs_socketio",
            "replies/s at equal latency ÷ python-socketio",
        ),
        ("lost_duplicated_reordered", "lost, duplicated or reordered (embedded + production)"),
    ):
        item = g[key]
        value = item["value"]
        if key == "replies_per_s_at_equal_latency_vs_socketio":
            ours, theirs = rate["production_replies_per_s"], rate["socketio_replies_per_s"]
            value = (
                f"{'-' if value is None else value} (production "
                f"{_held(ours, capacity.get('production'))}, python-socketio "
                f"{_held(theirs, capacity.get('socketio'))})"
            )
        lines.append(f"| {label} | {value} | {item['goal']} | **{verdict(item['met'])}** |")
    lines += [
        "",
        f"- replies/s at the same {level} concurrent replies (not at equal latency), "
        f"production ÷ python-socketio: {g['replies_per_s_at_equal_concurrency_vs_socketio']} "
        f"({prod_row['replies_per_s']} vs {peer_row['replies_per_s']})",
        f"- python-socketio lost/duplicated/reordered at {level}: {g['socketio_defects']} "
        "(its deltas are checked by `seq` like ours)",
        f"- per reply, production carried {prod_row['deltas_per_reply']} deltas and the "
        f"embedded instance {table[str(level)]['deltas_per_reply']}: a late stream coalesces "
        "words into fewer deltas, so per-reply Redis counts fall when the server falls behind",
    ]
    return lines


def _held(rate: float | None, level: int | None) -> str:
    if rate is None:
        return "held both latency goals at no level run"
    return f"{rate} replies/s at {level} concurrent replies, the most that held both goals"


def _us(value: float | None) -> str:
    return "-" if value is None else f"{value} µs"


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


def _capacity(rows: dict[int, dict[str, Any]]) -> int | None:
    """The highest level that met both goals, as did every level below it; None if none."""
    best = None
    for level in sorted(rows):
        row = rows[level]
        if not (
            _below(row["ttft_added_p50_ms"], GOAL_TTFT_P50_MS)
            and _below(row["gap_added_p99_ms"], GOAL_GAP_P99_MS)
        ):
            break
        best = level
    return best


def _below(value: float | None, limit: float) -> bool | None:
    return None if value is None else value < limit


if __name__ == "__main__":
    sys.exit(main())
