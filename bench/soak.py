"""Soak: steady mixed load for a long while, each instance's memory sampled every 15 s.

    .venv/bin/python bench/soak.py [--minutes 30] [--modes embedded,production] [--quick]

Per mode, on 127.0.0.1: embedded (one instance, SQLite), then production (two instances on
one Redis and one Postgres, fsync on). The load runs the whole time, from the project's own
harness (chatload), two loads side by side against the same conversations throughout:

- ``ai``: ``--ai-clients`` clients, each alone with the agent in its own conversation, in a
  closed loop (send, follow the reply to ``gen_end``, send again);
- ``chat``: ``--chat-clients`` clients in conversations of ``--chat-members``, sending
  ``--chat-rate`` messages/s in all; every message is a question the agent answers too.

The instances run with the product's own bounds (replies queued per conversation and per
instance) and unlimited per-user rates.

Every ``--sample-s`` seconds, for each instance: its RSS (``/proc``), its Python heap
(``GET /api/admin/memory``: the allocated blocks, the collector's counts, the fill of every
bounded structure) and the replies ended so far (``chat_replies_total`` on ``/metrics``).
The warm-up (``--warmup-minutes``) is by default a third of the run, at most 10 minutes: the
bounded caches fill meanwhile. When the load is over: a full collection
(``POST /api/admin/memory/collect``), and what cyclic garbage it found.

Allocation sites come from a second, shorter run of each mode (``--sites-minutes``, by
default a fifth, 2 to 6 minutes) on fresh instances started with ``CHAT_TRACEMALLOC_FRAMES``
(``--frames``; 0: no such run) at ``--sites-load`` of the load: tracing makes every allocation
several times dearer, so the RSS run is never traced. After its warm-up (a third) each
instance takes a baseline (``POST /api/admin/memory/sites``); when its load is over, the
sites that grew most since (``GET /api/admin/memory/sites``).

Reported per instance: the RSS and heap growth after the warm-up as a least-squares slope in
MiB per minute, over the whole post-warm-up span and over its last 10 minutes (the last third
when the run is shorter), the same per 10,000 replies, and the top sites. Goals (issue 24):
RSS growth <= 0.5 MiB/min per instance after the warm-up and in the last stretch, nothing
lost or duplicated. Writes ``bench/results/soak-<minutes>min.json`` (``soak.json`` with
``--quick``, a smoke run of every step: ``tests/system/test_bench_smoke.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp

from bench.common import (
    SECRET,
    SERVER_ENV,
    base_args,
    chatservers,
    git_commit,
    log,
    machine,
    pid_of,
    postgres_server,
    redis_server,
    slim,
    verdict,
    write_result,
)
from chatload import LoadConfig, run_loadtest
from chatload.procstat import cpu_seconds, rss_kib
from chatload.report import summary_line
from chatserver.auth import Authenticator
from chatserver.settings import defaults
from tests.serverproc import ServerProc

GOAL_MIB_PER_MIN = 0.5
MIB = 1024 * 1024
LAST_STRETCH_MIN = 10.0
# Bounded structures that come and go with the load (not caches that fill and stay full).
QUEUES = frozenset({"outbox_entries", "replies_held", "metric_children"})
# The product's own bounds on queued replies, not the other scenarios' "unlimited": a soak
# measures the deployment as shipped (a load beyond them is refused, never queued without end).
SOAK_ENV = {
    **SERVER_ENV,
    "CHAT_MAX_QUEUED_REPLIES": str(defaults()["max_queued_replies"]),
    "CHAT_MAX_REPLIES_PER_INSTANCE": str(defaults()["max_replies_per_instance"]),
}


class Instance:
    """One chatserver process as the sampler sees it."""

    def __init__(self, name: str, server: ServerProc) -> None:
        self.name = name
        self.server = server
        self.pid = pid_of(server)
        self.samples: list[dict[str, Any]] = []
        self.sites: dict[str, Any] | None = None
        self.marked: dict[str, Any] | None = None


async def _get(http: aiohttp.ClientSession, url: str, token: str | None = None) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with http.get(url, headers=headers, timeout=aiohttp.ClientTimeout(total=60)) as r:
        if r.content_type == "application/json":
            return await r.json()
        return await r.text()


def _replies_ended(metrics_text: str) -> int:
    total = 0.0
    for line in metrics_text.splitlines():
        if line.startswith("chat_replies_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


async def _sample(
    http: aiohttp.ClientSession, instance: Instance, admin: str, t0: float
) -> dict[str, Any]:
    base = instance.server.url
    memory = await _get(http, f"{base}/api/admin/memory", admin)
    replies = _replies_ended(await _get(http, f"{base}/metrics"))
    traced = memory.get("tracemalloc") or {}
    return {
        "t_min": round((time.monotonic() - t0) / 60, 3),
        "rss_mib": round((rss_kib(instance.pid) or 0) / 1024, 2),
        "traced_mib": (
            round(traced["traced_bytes"] / MIB, 2) if "traced_bytes" in traced else None
        ),
        "allocated_blocks": memory["allocated_blocks"],
        "gc_counts": memory["gc"]["counts"],
        "gc_collections": memory["gc"]["collections"],
        "replies": replies,
        "cpu_s": cpu_seconds(instance.pid),
        "bounded": {k: v["entries"] for k, v in memory["bounded"].items()},
    }


async def _sampler(
    instances: list[Instance],
    admin: str,
    t0: float,
    every_s: float,
    mark_at_s: float | None,
    stop: asyncio.Event,
) -> None:
    marked = mark_at_s is None
    async with aiohttp.ClientSession() as http:
        while True:
            for instance in instances:
                try:
                    instance.samples.append(await _sample(http, instance, admin, t0))
                except Exception as exc:  # an instance that stopped answering: say so
                    log(f"  {instance.name}: sample failed: {exc!r}")
            if not marked and mark_at_s is not None and time.monotonic() - t0 >= mark_at_s:
                marked = True
                for instance in instances:
                    with contextlib.suppress(Exception):
                        async with http.post(
                            f"{instance.server.url}/api/admin/memory/sites",
                            headers={"Authorization": f"Bearer {admin}"},
                        ) as r:
                            instance.marked = await r.json() if r.status == 200 else None
            last = instances[0].samples[-1] if instances[0].samples else None
            if last is not None:
                shown = ", ".join(
                    f"{i.name} {i.samples[-1]['rss_mib']} MiB" for i in instances if i.samples
                )
                log(f"  t={last['t_min']:.2f} min: {shown}, replies {last['replies']}")
            try:
                await asyncio.wait_for(stop.wait(), every_s)
                return
            except TimeoutError:
                pass


async def _idle(instances: list[Instance], admin: str, timeout_s: float = 120.0) -> None:
    """Until no instance holds a reply or an outbox entry (or the timeout: said so)."""
    busy = ("replies_held", "outbox_entries")
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as http:
        while True:
            left = 0
            for instance in instances:
                with contextlib.suppress(Exception):
                    body = await _get(http, f"{instance.server.url}/api/admin/memory", admin)
                    left += sum(body["bounded"].get(k, {}).get("entries", 0) for k in busy)
            if left == 0:
                return
            if time.monotonic() > deadline:
                log(f"  still busy after {timeout_s:g} s: {left} replies or entries held")
                return
            await asyncio.sleep(0.5)


async def _sites(instances: list[Instance], admin: str, top: int) -> None:
    async with aiohttp.ClientSession() as http:
        for instance in instances:
            url = f"{instance.server.url}/api/admin/memory/sites?top={top}"
            try:
                found = await _get(http, url, admin)
            except Exception as exc:
                log(f"  {instance.name}: sites failed: {exc!r}")
                continue
            instance.sites = found if isinstance(found, dict) and "sites" in found else None


@dataclass(frozen=True)
class Phase:
    """One run of a mode: the RSS run (untraced, the whole load) or the sites run (traced,
    a share of the load: tracing makes every allocation several times dearer)."""

    minutes: float
    warmup_minutes: float
    share: float = 1.0
    traced: bool = False


def _configs(
    args: argparse.Namespace, urls: list[str], pids: list[int], phase: Phase
) -> list[LoadConfig]:
    seconds = phase.minutes * 60
    share = phase.share
    members = args.chat_members
    chat_clients = max(members, round(args.chat_clients * share / members) * members)
    common: dict[str, Any] = {
        "urls": urls,
        "jwt_secret": SECRET,
        "quiet": True,
        "duration_s": seconds,
        "server_pids": pids,
        "drain_timeout_s": 60,
        "ack_timeout_s": 30,
        "procs": 1,
    }
    ai = LoadConfig(
        **common,
        label="soak ai",
        mode="ai",
        clients=max(1, round(args.ai_clients * share)),
        members=1,
        rate=0,
        window=1,
        ramp_s=args.ramp,
        text_bytes=48,
    )
    chat = LoadConfig(
        **common,
        label="soak chat",
        mode="chat",
        clients=chat_clients,
        members=members,
        rate=args.chat_rate * share,
        ramp_s=args.ramp,
        text_bytes=48,
    )
    return [ai, chat]


async def _soak(
    args: argparse.Namespace, instances: list[Instance], phase: Phase
) -> dict[str, Any]:
    admin = Authenticator(SECRET).issue("soak-ops", "free", "admin", ttl_s=6 * 3600)
    urls = [i.server.url for i in instances]
    configs = _configs(args, urls, [i.pid for i in instances], phase)
    t0 = time.monotonic()
    stop = asyncio.Event()
    mark_at = phase.warmup_minutes * 60 if phase.traced else None
    sampler = asyncio.create_task(_sampler(instances, admin, t0, args.sample_s, mark_at, stop))
    try:
        reports = await asyncio.gather(*(run_loadtest(c) for c in configs))
    finally:
        stop.set()
        await sampler
    for report in reports:
        log(f"  {report['label']}: {summary_line(report)}")
    # Chat clients do not wait for their replies: those still queued run on after the load.
    # What is measured next is what stays, so first let every instance come to rest.
    await _idle(instances, admin)
    if phase.traced:
        await _sites(instances, admin, args.top)
        return {
            "minutes": phase.minutes,
            "warmup_minutes": phase.warmup_minutes,
            "load_share": phase.share,
            "frames": args.frames,
            "replies": sum(r["counts"]["replies"]["ended"] for r in reports),
            "defects": sum(r["counts"]["defects"] for r in reports),
            "instances": {
                i.name: {"samples": i.samples, "marked": i.marked, "sites": i.sites}
                for i in instances
            },
        }
    idle: dict[str, Any] = {}
    collected: dict[str, Any] = {}
    async with aiohttp.ClientSession() as http:  # idle, once the load is over
        for instance in instances:
            with contextlib.suppress(Exception):
                idle[instance.name] = await _sample(http, instance, admin, t0)
            # Then a full collection: what was cyclic garbage waiting for one, and of what.
            with contextlib.suppress(Exception):
                async with http.post(
                    f"{instance.server.url}/api/admin/memory/collect?top={args.top}",
                    headers={"Authorization": f"Bearer {admin}"},
                ) as r:
                    found = await r.json()
                found["after"] = await _sample(http, instance, admin, t0)
                collected[instance.name] = found
    return {
        "log_events": {i.name: _log_events(i.server) for i in instances},
        "loads": {r["label"]: slim(r) for r in reports},
        "defects": sum(r["counts"]["defects"] for r in reports),
        "rejected": sum(sum(r["counts"]["rejected"].values()) for r in reports),
        "replies": sum(r["counts"]["replies"]["ended"] for r in reports),
        "idle_after": idle,
        "full_collection_after": collected,
        "instances": {
            i.name: {"pid": i.pid, "samples": i.samples, "growth": _growth(i.samples, args)}
            for i in instances
        },
    }


def _log_events(server: ServerProc) -> dict[str, int]:
    """How often each warning or error event was logged (the instances log at warning)."""
    counts: dict[str, int] = {}
    for line in server.output.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and event.get("level") in ("warning", "error"):
            key = f"{event['level']}: {str(event.get('event', ''))[:60]}"
            counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1])[:20])


def _slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (x, y) points; None with fewer than three."""
    if len(points) < 3:
        return None
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in points) / sxx


def _growth(samples: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    after = [s for s in samples if s["t_min"] >= args.warmup_minutes]
    stretch = min(LAST_STRETCH_MIN, args.minutes / 3)
    last = [s for s in after if s["t_min"] >= args.minutes - stretch]

    def per_min(rows: list[dict[str, Any]], key: str) -> float | None:
        points = [(s["t_min"], float(s[key])) for s in rows if s.get(key) is not None]
        slope = _slope(points)
        return None if slope is None else round(slope, 3) + 0.0  # no "-0.0"

    def replies_per_min(rows: list[dict[str, Any]]) -> float | None:
        return per_min(rows, "replies")

    def per_10k(mib_per_min: float | None, rows: list[dict[str, Any]]) -> float | None:
        rate = replies_per_min(rows)
        if mib_per_min is None or not rate:
            return None
        return round(mib_per_min / rate * 10_000, 3)

    # When each bounded structure was (nearly) as full as it got: growth before that is a
    # cache filling towards its bound, not a leak.
    peaks: dict[str, float] = {}
    for sample in samples:
        for name, size in sample.get("bounded", {}).items():
            if name not in QUEUES:
                peaks[name] = max(peaks.get(name, 0), size)
    filled = {
        name: next(
            (s["t_min"] for s in samples if s.get("bounded", {}).get(name, 0) >= 0.98 * peak),
            None,
        )
        for name, peak in peaks.items()
        if peak > 0
    }
    rss = per_min(after, "rss_mib")
    rss_last = per_min(last, "rss_mib")
    full_at = max(filled.values(), default=0.0)
    after_full = [s for s in samples if s["t_min"] >= max(full_at, args.warmup_minutes)]
    out: dict[str, Any] = {
        "warmup_min": args.warmup_minutes,
        "last_stretch_min": round(stretch, 2),
        "samples_after_warmup": len(after),
        "rss_start_mib": after[0]["rss_mib"] if after else None,
        "rss_end_mib": after[-1]["rss_mib"] if after else None,
        "rss_max_mib": max((s["rss_mib"] for s in after), default=None),
        "rss_mib_per_min": rss,
        "rss_mib_per_min_last": rss_last,
        "rss_mib_per_10k_replies": per_10k(rss, after),
        "allocated_blocks_per_min": per_min(after, "allocated_blocks"),
        "replies_per_min": replies_per_min(after),
        "bounded_filled_at_min": filled,
        # From when the last bounded structure filled (or the warm-up's end, if later).
        "rss_mib_per_min_after_filled": per_min(after_full, "rss_mib"),
        "samples_after_filled": len(after_full),
    }
    out["goal_met"] = (
        None
        if rss is None or rss_last is None
        else rss <= GOAL_MIB_PER_MIN and rss_last <= GOAL_MIB_PER_MIN
    )
    return out


@contextlib.contextmanager
def _mode(name: str, frames: int) -> Iterator[list[Instance]]:
    env = {**SOAK_ENV, "CHAT_TRACEMALLOC_FRAMES": str(frames)}
    if name == "embedded":
        with chatservers(1, env=env) as servers:
            yield [Instance("embedded", servers[0])]
        return
    with redis_server() as redis, postgres_server() as postgres:
        dsn = postgres.dsn_for("chat")
        with chatservers(2, redis_url=redis.url, env=env, args=["--database-url", dsn]) as servers:
            yield [Instance(f"production-{i}", s) for i, s in enumerate(servers)]


def _markdown(args: argparse.Namespace, modes: dict[str, Any]) -> list[str]:
    lines = [
        f"{args.minutes:g}-minute run per mode, warm-up {args.warmup_minutes:g} min, a sample "
        f"every {args.sample_s:g} s. Load throughout: {args.ai_clients} `ai` clients (closed "
        f"loop, each alone with the agent) and {args.chat_clients} `chat` clients in "
        f"conversations of {args.chat_members} at {args.chat_rate:g} messages/s (each a "
        "question the agent answers). Local model: TTFT 150 ms, 15 ms a word. The product's "
        "own bounds; the RSS runs untraced (the allocation sites below come from a separate "
        "traced run). Columns: the least-squares slope of RSS after the warm-up, over the "
        "last stretch, and from when the last bounded cache filled.",
        "",
        "| mode | instance | replies (mode) | RSS after warm-up → end | RSS MiB/min: after "
        "warm-up / last stretch / after the caches filled | MiB per 10k replies | Python "
        f"blocks/min | lost/dup | goal ≤ {GOAL_MIB_PER_MIN} MiB/min |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, result in modes.items():
        for name, inst in result["instances"].items():
            g = inst["growth"]
            lines.append(
                f"| {mode} | {name} | {result['replies']} | {g['rss_start_mib']} → "
                f"{g['rss_end_mib']} MiB | {g['rss_mib_per_min']} / {g['rss_mib_per_min_last']}"
                f" / {g['rss_mib_per_min_after_filled']} | {g['rss_mib_per_10k_replies']} | "
                f"{g['allocated_blocks_per_min']} | {result['defects']} | "
                f"**{verdict(g['goal_met'])}** |"
            )
    lines += [
        "",
        "Minute when each bounded cache was as full as it got (its bound, or where this load "
        "keeps it; queues left out):",
        "",
    ]
    for result in modes.values():
        for name, inst in result["instances"].items():
            filled = inst["growth"]["bounded_filled_at_min"]
            shown = ", ".join(f"`{k}` {v:g}" for k, v in sorted(filled.items()) if v is not None)
            lines.append(f"- {name}: {shown}")
    lines += ["", "RSS (MiB) by minute:", ""]
    names = [(m, n) for m, r in modes.items() for n in r["instances"]]
    lines.append("| minute | " + " | ".join(n for _, n in names) + " |")
    lines.append("|---|" + "---|" * len(names))
    minute = 0.0
    while minute <= args.minutes + 1e-9:
        cells = []
        for mode, name in names:
            samples = modes[mode]["instances"][name]["samples"]
            near = min(samples, key=lambda s: abs(s["t_min"] - minute), default=None)
            cells.append("" if near is None else f"{near['rss_mib']}")
        lines.append(f"| {minute:g} | " + " | ".join(cells) + " |")
        minute += 1.0 if args.minutes <= 15 else 2.0
    for result in modes.values():
        run = result.get("sites_run")
        if run is None:
            continue
        for name, inst in run["instances"].items():
            sites = (inst.get("sites") or {}).get("sites") or []
            if not sites:
                continue
            lines += [
                "",
                f"Top allocation sites by growth, {name}: a {run['minutes']:g}-minute run at "
                f"{run['load_share']:g} of the load with tracemalloc ({run['frames']} frames), "
                f"from its warm-up ({run['warmup_minutes']:.2g} min) to idle after the load:",
                "",
            ]
            lines += ["| grew | blocks | site (allocating frame first) |", "|---|---|---|"]
            for site in sites[:8]:
                where = " ← ".join(site["traceback"][:3])
                lines.append(
                    f"| {site['size_diff'] / 1024:.1f} KiB | {site['count_diff']} | `{where}` |"
                )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="per mode")
    parser.add_argument("--warmup-minutes", type=float, help="default: a third, at most 10")
    parser.add_argument("--modes", default="embedded,production")
    parser.add_argument("--ai-clients", type=int, default=60)
    parser.add_argument("--chat-clients", type=int, default=200)
    parser.add_argument("--chat-members", type=int, default=2)
    parser.add_argument("--chat-rate", type=float, default=50.0, help="messages/s in all")
    parser.add_argument("--ramp", type=float, default=5.0)
    parser.add_argument("--sample-s", type=float, default=15.0)
    parser.add_argument(
        "--frames", type=int, default=2, help="tracemalloc frames of the sites run (0: none)"
    )
    parser.add_argument("--sites-minutes", type=float, help="default: a fifth, 2 to 6")
    parser.add_argument(
        "--sites-load", type=float, default=0.15, help="share of the load in the sites run"
    )
    parser.add_argument("--top", type=int, default=25, help="allocation sites reported")
    parser.add_argument(
        "--quick", action="store_true", help="12 s per mode and 9 s traced, a light load"
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.quick:  # the smoke test's: every step once, in about a minute per mode
        args.minutes, args.ai_clients, args.chat_clients, args.chat_rate = 0.2, 10, 20, 10.0
        args.sample_s = min(args.sample_s, 1.5)
        args.sites_minutes = args.sites_minutes or 0.15
        args.warmup_minutes = args.warmup_minutes or 0.08
        args.sites_load = max(args.sites_load, 0.5)
    if args.sites_minutes is None:
        args.sites_minutes = min(6.0, max(2.0, args.minutes / 5))
    if args.warmup_minutes is None:
        args.warmup_minutes = min(10.0, max(0.5, args.minutes / 3))
    modes = [m for m in args.modes.split(",") if m]
    unknown = set(modes) - {"embedded", "production"}
    if unknown:
        parser.error(f"unknown modes: {', '.join(sorted(unknown))}")
    results: dict[str, Any] = {}
    main_run = Phase(args.minutes, args.warmup_minutes)
    sites_run = Phase(args.sites_minutes, args.sites_minutes / 3, args.sites_load, traced=True)
    for mode in modes:
        log(f"soak {mode}: {args.minutes:g} min, warm-up {args.warmup_minutes:.3g} min")
        with _mode(mode, 0) as instances:
            results[mode] = asyncio.run(_soak(args, instances, main_run))
        if args.frames > 0 and args.sites_minutes > 0:
            log(
                f"soak {mode}, allocation sites: {args.sites_minutes:g} min at "
                f"{args.sites_load:g} of the load, tracemalloc {args.frames} frames"
            )
            with _mode(mode, args.frames) as instances:
                results[mode]["sites_run"] = asyncio.run(_soak(args, instances, sites_run))
    lost = sum(r["defects"] for r in results.values())
    goals = {
        "rss_growth_per_instance": {
            "value": {
                name: [inst["growth"]["rss_mib_per_min"], inst["growth"]["rss_mib_per_min_last"]]
                for r in results.values()
                for name, inst in r["instances"].items()
            },
            "goal": f"<= {GOAL_MIB_PER_MIN} MiB/min after warm-up and in the last stretch",
            "met": all(
                inst["growth"]["goal_met"]
                for r in results.values()
                for inst in r["instances"].values()
            ),
        },
        "lost_duplicated": {"value": lost, "goal": "0", "met": lost == 0},
    }
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    write_result(
        "soak" if args.quick else f"soak-{args.minutes:g}min",
        {
            "scenario": "soak",
            **base_args(args.quick),
            "machine": machine(),
            "git_commit": git_commit(),
            "settings": settings,
            "goals": goals,
            "modes": results,
            "markdown": "\n".join(_markdown(args, results)),
        },
        args.out,
    )
    return 0 if goals["lost_duplicated"]["met"] else 1


if __name__ == "__main__":
    sys.exit(main())
