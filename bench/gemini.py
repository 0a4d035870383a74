"""Gemini streaming through the provider: chunks/s, CPU per chunk, added latency.

    .venv/bin/python bench/gemini.py [--concurrency 1000] [--seconds 8] [--out bench/results]

The fake Gemini server (tests/fakegemini.py) runs in its OWN process, so what is measured is
the provider's side: one client process (uvloop, like ``chatserver serve``) keeps
``--concurrency`` replies streaming at all times (a reply that ends is replaced at once),
each consumed straight from ``provider.stream()``. Both transports run the same load:

- ``sdk``: google-genai's ``client.aio.models.generate_content_stream``;
- ``sse``: the lean path (aiohttp + ``json``, ``chatserver/generation/gemini_sse.py``).

Two loads per transport, each in a fresh client process:

- ``saturation``: the fake paces every stream at 20 ms a chunk (50,000 chunks/s offered at
  1,000 streams), more than one core can take: the chunks/s reached is the ceiling, and the
  CPU per chunk is process CPU time / chunks;
- ``goal``: the fake paces every stream at 160 ms a chunk (6,250 chunks/s offered at 1,000
  streams), just above the goal: are 5,000 chunks/s sustained, what latency is added.

Streams start staggered over one reply's length, so replies end and start evenly (no
synchronised reconnect storm every reply).

Added latency: the fake writes its send time (``time.time_ns()``) into each chunk's text; the
client subtracts it from the time it got the chunk out of ``provider.stream()``. That is the
whole path from the fake's write to the chunk in our hands (kernel, HTTP, SSE, JSON, SDK
objects), p50 and p99 over the measured window.

Prints a table and writes ``bench/results/gemini-<date>.json``. Bounded: about a minute.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from chatserver.generation.gemini import GeminiProvider  # noqa: E402
from chatserver.generation.gemini_common import GeminiConfig, RetryPolicy  # noqa: E402
from chatserver.generation.gemini_sse import GeminiSseProvider  # noqa: E402
from chatserver.generation.provider import Chunk, Finish, ReplyRequest  # noqa: E402
from protocol import Message  # noqa: E402

CHUNKS_PER_REPLY = 40
LOADS = {"saturation": 20.0, "goal": 160.0}  # fake pace per stream, ms
GOAL_CHUNKS_S = 5000
GOAL_P50_MS = 10.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _start_fake(pace_ms: float) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.fakegemini",
            "--port",
            str(port),
            "--chunks",
            str(CHUNKS_PER_REPLY),
            "--pace-ms",
            str(pace_ms),
            "--stamp",
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,  # clients cancelled at the end: aiohttp logs resets
    )
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return proc, f"http://127.0.0.1:{port}"
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("the fake Gemini server did not start")


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process (Linux /proc), to show the fake is not the bottleneck."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- the client process -----------------------------------------------------------------------


async def _client(args: argparse.Namespace) -> dict[str, Any]:
    config = GeminiConfig("bench-key", args.base_url, timeout_s=30, retry=RetryPolicy(attempts=1))
    provider = GeminiProvider(config) if args.transport == "sdk" else GeminiSseProvider(config)
    message = Message("m1", "c1", 1, "user", "hello", "2026-01-01T00:00:00.000Z", user_id="u")
    request = ReplyRequest("general", "gemini-2.5-flash", "Be brief.", (message,), 0.7, 1024)
    loop = asyncio.get_running_loop()
    counting = False
    chunks = 0
    replies = 0
    errors = 0
    latencies: list[int] = []

    async def worker() -> None:
        nonlocal chunks, replies, errors
        await asyncio.sleep(random.uniform(0, args.stagger))
        while True:
            async for item in provider.stream(request):
                if isinstance(item, Chunk):
                    if counting:
                        now = time.time_ns()
                        chunks += 1
                        latencies.append(now - int(item.text.rsplit("|", 1)[1]))
                elif isinstance(item, Finish) and counting:
                    replies += 1
                    errors += item.reason != "stop"

    workers = [loop.create_task(worker()) for _ in range(args.concurrency)]
    await asyncio.sleep(args.warmup)  # every stream connected and flowing
    counting = True
    cpu0, wall0 = time.process_time(), time.perf_counter()
    await asyncio.sleep(args.seconds)
    counting = False
    cpu1, wall1 = time.process_time(), time.perf_counter()
    for task in workers:
        task.cancel()
    await asyncio.gather(*workers, return_exceptions=True)
    await provider.close()
    wall, cpu = wall1 - wall0, cpu1 - cpu0
    latencies.sort()
    ms = [x / 1e6 for x in latencies]
    return {
        "transport": args.transport,
        "concurrency": args.concurrency,
        "seconds": round(wall, 2),
        "chunks": chunks,
        "replies": replies,
        "errors": errors,
        "chunks_per_s": round(chunks / wall),
        "cpu_util": round(cpu / wall, 3),
        "cpu_us_per_chunk": round(cpu / chunks * 1e6, 1) if chunks else None,
        "latency_ms_p50": round(statistics.median(ms), 2) if ms else None,
        "latency_ms_p99": round(ms[int(len(ms) * 0.99)], 2) if ms else None,
    }


def _run_client(args: argparse.Namespace) -> None:
    try:
        import uvloop

        result = uvloop.run(_client(args))
    except ImportError:
        result = asyncio.run(_client(args))
    print(json.dumps(result))


# -- the orchestrator -------------------------------------------------------------------------


def _measure(
    transport: str, base_url: str, pace_ms: float, args: argparse.Namespace
) -> dict[str, Any]:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--client",
        "--transport",
        transport,
        "--base-url",
        base_url,
        "--concurrency",
        str(args.concurrency),
        "--seconds",
        str(args.seconds),
        "--warmup",
        str(args.warmup),
        "--stagger",
        str(CHUNKS_PER_REPLY * pace_ms / 1000),
    ]
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=8.0)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--transport", default="sse", help=argparse.SUPPRESS)
    parser.add_argument("--base-url", default="", help=argparse.SUPPRESS)
    parser.add_argument("--stagger", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        _run_client(args)
        return

    load_before = os.getloadavg()
    fakes = {load: _start_fake(pace) for load, pace in LOADS.items()}
    results: dict[str, dict[str, Any]] = {}
    try:
        for load, (proc, url) in fakes.items():
            for transport in ("sdk", "sse"):
                print(f"{transport} / {load} ...", flush=True)
                fake_cpu, started = _cpu_seconds(proc.pid), time.perf_counter()
                measured = _measure(transport, url, LOADS[load], args)
                fake_util = (_cpu_seconds(proc.pid) - fake_cpu) / (time.perf_counter() - started)
                results[f"{transport}/{load}"] = {
                    "load": load,
                    "offered_chunks_per_s": round(args.concurrency * 1000 / LOADS[load]),
                    **measured,
                    "fake_cpu_util": round(fake_util, 3),  # over warm-up and measurement
                }
    finally:
        for proc, _ in fakes.values():
            proc.terminate()
            proc.wait(10)

    header = f"{'transport/load':<16}{'chunks/s':>10}{'CPU µs/chunk':>14}{'CPU':>6}"
    print(f"\n{header}{'fake CPU':>9}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}")
    for name, r in results.items():
        print(
            f"{name:<16}{r['chunks_per_s']:>10}{r['cpu_us_per_chunk']:>14}"
            f"{r['cpu_util']:>6.2f}{r['fake_cpu_util']:>9.2f}"
            f"{r['latency_ms_p50']:>9}{r['latency_ms_p99']:>9}{r['errors']:>8}"
        )
    goals = {}
    for transport in ("sdk", "sse"):
        saturated, goal = results[f"{transport}/saturation"], results[f"{transport}/goal"]
        best = max(saturated["chunks_per_s"], goal["chunks_per_s"])
        cpu_us = saturated["cpu_us_per_chunk"] or 1e9
        goals[transport] = {
            "best_chunks_per_s": best,
            "cpu_bound_ceiling_chunks_per_s": round(1e6 / cpu_us),  # one core, all for this
            "meets_5000_chunks_per_s": best >= GOAL_CHUNKS_S,
            "p50_ms_at_goal_load": goal["latency_ms_p50"],
            "meets_p50_under_10ms": (goal["latency_ms_p50"] or 1e9) < GOAL_P50_MS,
        }
    print("\ngoal (>= 5,000 chunks/s, p50 < 10 ms):", json.dumps(goals, indent=1))
    report = {
        "bench": "gemini",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "load_average_before": [round(x, 2) for x in load_before],
            "note": "a shared 2-core machine: the fake and the client compete for the cores",
        },
        "setup": {
            "concurrency": args.concurrency,
            "chunks_per_reply": CHUNKS_PER_REPLY,
            "measured_seconds": args.seconds,
            "fake": "tests/fakegemini.py in its own process (uvloop), paced per stream",
            "loop": "uvloop",
        },
        "results": results,
        "goals": goals,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"gemini-{datetime.now(UTC):%Y-%m-%d}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")


if __name__ == "__main__":
    main()
