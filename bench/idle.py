"""CPU an idle server spends on its own, beside the peers, in one run.

    .venv/bin/python bench/idle.py [--seconds 20] [--quick]

Each setup is started fresh with no client and left to settle, then the CPU its processes
spend over ``--seconds`` (``/proc/<pid>/stat``: user and system) is divided by the seconds:
milliseconds of CPU a second, per process. Setups: chatserver on the embedded default (one
instance); chatserver in production mode (two instances on one Redis and one Postgres); the
bare aiohttp peer (one process); the python-socketio peer (two processes on the same Redis,
``AsyncRedisManager``). What an idle server spends is background work: timers, polls,
heartbeats, lease and presence upkeep; every instance of a deployment pays it, busy or not.
Writes ``bench/results/idle.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    base_args,
    chatservers,
    git_commit,
    log,
    machine,
    peers,
    pid_of,
    postgres_server,
    ratio,
    redis_server,
    write_result,
)
from chatload.procstat import cpu_seconds


def idle_ms_per_s(pids: list[int], settle_s: float, seconds: float) -> list[float | None]:
    """Each process's CPU over ``seconds`` after ``settle_s``, in ms a second."""
    time.sleep(settle_s)
    before = [cpu_seconds(pid) for pid in pids]
    time.sleep(seconds)
    after = [cpu_seconds(pid) for pid in pids]
    return [
        round((b - a) * 1000 / seconds, 2) if a is not None and b is not None else None
        for a, b in zip(before, after, strict=True)
    ]


def _beside(each: dict[str, float | None]) -> str:
    """The production instance's figure beside each peer's (CPU time is read in 10-ms ticks:
    a figure of 0 is under ``1000 / seconds`` ms a second)."""
    ours = each["chatserver production"]
    parts = []
    for peer in ("bare aiohttp", "python-socketio"):
        theirs = each[peer]
        if theirs:
            parts.append(f"{ratio(ours, theirs)}x {peer}")
        else:
            parts.append(f"{peer} under the clock's resolution")
    return f"An idle production instance: {ours} ms a second ({'; '.join(parts)})."


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--settle", type=float, default=3.0)
    parser.add_argument("--quick", action="store_true", help="1-s windows")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.settle = 1.0, 0.5
    figures: dict[str, list[float | None]] = {}
    log(f"idle: CPU over {args.seconds} s with no client, after {args.settle} s")
    with redis_server() as redis, postgres_server() as postgres:
        dsn = postgres.dsn_for("chat")
        with chatservers(1) as servers:
            figures["chatserver embedded"] = idle_ms_per_s(
                [pid_of(s) for s in servers], args.settle, args.seconds
            )
        with chatservers(2, redis_url=redis.url, args=["--database-url", dsn]) as servers:
            figures["chatserver production"] = idle_ms_per_s(
                [pid_of(s) for s in servers], args.settle, args.seconds
            )
        with peers("bare", 1) as started:
            figures["bare aiohttp"] = idle_ms_per_s(
                [p.pid for p in started], args.settle, args.seconds
            )
        with peers("sio", 2, redis.url) as started:
            figures["python-socketio"] = idle_ms_per_s(
                [p.pid for p in started], args.settle, args.seconds
            )
    for name, values in figures.items():
        log(f"  {name}: {values} ms of CPU a second")
    # The busier process of each setup stands for it.
    each = {
        name: max((v for v in vs if v is not None), default=None) for name, vs in figures.items()
    }
    lines = [
        "| setup | processes | CPU per process, ms a second |",
        "|---|---|---|",
        *(
            f"| {name} | {len(vs)} | {' / '.join(str(v) for v in vs)} |"
            for name, vs in figures.items()
        ),
        "",
        _beside(each),
    ]
    write_result(
        "idle",
        {
            "scenario": "idle",
            **base_args(args.quick),
            "machine": machine(),
            "git_commit": git_commit(),
            "settings": {"seconds": args.seconds, "settle": args.settle},
            "ms_per_s": figures,
            "markdown": "\n".join(lines),
        },
        args.out,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
