"""Event-loop passes a Redis round trip costs on a busy loop: the tick-pipelined client
(chatserver/redis_ticks.py) on its lane (chatserver/redis_lane.py, what the server runs) and
on kept connections read by redis-py, beside redis-py's own ``redis.asyncio.Redis`` (the
peer).

Under load an instance's loop is busy: each pass runs every ready callback (hundreds of
replies' deltas), so a pass lasts milliseconds and a round trip costs as many of them as it
waits through. This counts them, which does not depend on how fast or shared the machine is:
``--tasks`` tasks each burn a little CPU and yield every pass, one more counts the passes,
and a caller issues ``GET`` after ``GET`` (``--rounds``) on each client, on uvloop as the
server runs. Reported per round trip: passes (median, mean) and milliseconds.

Writes ``bench/results/loop-passes.json``. Seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import uvloop
from redis.asyncio import Redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import git_commit, log, machine, redis_server, write_result
from chatserver.redis_ticks import TickPipelinedRedis


class Loop:
    """Busy tasks and a pass counter."""

    def __init__(self, tasks: int, work: int) -> None:
        self.passes = 0
        self._stop = asyncio.Event()
        self._tasks = [asyncio.create_task(self._busy(work)) for _ in range(tasks)]
        self._tasks.append(asyncio.create_task(self._count()))

    async def _busy(self, work: int) -> None:
        while not self._stop.is_set():
            sum(range(work))
            await asyncio.sleep(0)

    async def _count(self) -> None:
        while not self._stop.is_set():
            self.passes += 1
            await asyncio.sleep(0)

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)


async def _measure(client: Redis, loop: Loop, rounds: int) -> dict[str, float]:
    await client.ping()  # connected: the handshake is not counted
    passes: list[int] = []
    millis: list[float] = []
    for _ in range(rounds):
        before, started = loop.passes, time.perf_counter()
        await client.get("loop-passes")
        passes.append(loop.passes - before)
        millis.append((time.perf_counter() - started) * 1000)
    return {
        "passes_p50": statistics.median(passes),
        "passes_mean": round(statistics.mean(passes), 2),
        "ms_p50": round(statistics.median(millis), 3),
        "ms_mean": round(statistics.mean(millis), 3),
    }


async def _run(url: str, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    loop = Loop(args.tasks, args.work)
    await asyncio.sleep(0.2)  # the busy tasks running
    results: dict[str, dict[str, float]] = {}
    laned = TickPipelinedRedis.from_url(url)
    await laned.open_lane()
    kept = TickPipelinedRedis.from_url(url)
    kept.lean_replies = False  # a batch on a kept connection, its replies read by redis-py
    clients: dict[str, Redis] = {
        "chatserver tick-pipelined, the lane": laned,
        "chatserver tick-pipelined, kept connections": kept,
        "redis-py Redis": Redis.from_url(url),
    }
    for _ in range(args.repeat):  # interleaved: a slow moment hits both
        for name, client in clients.items():
            figures = await _measure(client, loop, args.rounds)
            results.setdefault(name, {"runs": 0})
            results[name]["runs"] += 1
            for key, value in figures.items():
                results[name].setdefault(key, 0.0)
                results[name][key] += value / args.repeat
    await loop.stop()
    for client in clients.values():
        await client.aclose()
    return {name: {k: round(v, 3) for k, v in r.items()} for name, r in results.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=50, help="busy tasks on the loop")
    parser.add_argument("--work", type=int, default=1500, help="sum(range(N)) per task a pass")
    parser.add_argument("--rounds", type=int, default=300, help="GETs per client and repeat")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="30 GETs, once")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.repeat = 30, 1
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with redis_server() as redis:
        log(f"loop passes: {args.tasks} busy tasks, {args.rounds} GETs x {args.repeat} a client")
        results = uvloop.run(_run(redis.url, args))
    ours, peer = results["chatserver tick-pipelined, the lane"], results["redis-py Redis"]
    rows = [
        f"| {name} | {r['passes_p50']:g} | {r['passes_mean']:.2f} | {r['ms_p50']:.2f} ms |"
        for name, r in results.items()
    ]
    markdown = "\n".join(
        [
            "| client | loop passes per round trip, p50 | mean | time p50 |",
            "|---|---|---|---|",
            *rows,
            "",
            f"Passes per round trip, ours ÷ redis-py's: "
            f"{ours['passes_mean'] / peer['passes_mean']:.2f}",
        ]
    )
    data: dict[str, Any] = {
        "scenario": "loop-passes",
        "quick": args.quick,
        "started_at": started,
        "machine": machine(),
        "git_commit": git_commit(),
        "settings": vars(args) | {"out": str(args.out) if args.out else None},
        "results": results,
        "markdown": markdown,
    }
    write_result("loop-passes", data, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
