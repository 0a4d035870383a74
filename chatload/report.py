"""The JSON report: merged counts and histograms, rates, CPU and memory, SLO verdicts."""

from __future__ import annotations

import platform
from collections import Counter
from datetime import UTC, datetime
from typing import Any

from .config import LoadConfig
from .stats import HISTOGRAMS, Histogram

Samples = dict[str, dict[str, dict[str, float | int | None]]]
REQUESTS = ("ack", "join", "rest")  # what the request SLOs apply to


def _sum_cpu(
    samples: Samples, start: str, end: str, pids: list[int], key: str = "cpu_s"
) -> float | None:
    """What ``key`` grew by between two samples, over ``pids``; None if any is unknown."""
    total = 0.0
    for pid in pids:
        a = samples[start].get(str(pid), {}).get(key)
        b = samples[end].get(str(pid), {}).get(key)
        if a is None or b is None:
            return None
        total += float(b) - float(a)
    return round(total, 3)


def _sum_rss(samples: Samples, at: str, pids: list[int]) -> int | None:
    total = 0
    for pid in pids:
        value = samples[at].get(str(pid), {}).get("rss_kib")
        if value is None:
            return None
        total += int(value)
    return total


def _per(value: float | None, count: int, scale: float = 1e6) -> float | None:
    return round(value * scale / count, 3) if value is not None and count else None


def build_report(
    config: LoadConfig,
    reports: list[dict[str, Any]],
    ready: list[dict[str, Any]],
    *,
    samples: Samples,
    t_go_ns: int,
    end_ns: int,
    ramp_s: float,
    coordinator_cpu_s: float,
    redis: dict[str, Any] | None = None,
) -> dict[str, Any]:
    counts: Counter[str] = Counter()
    rejected: Counter[str] = Counter()
    close_codes: Counter[str] = Counter()
    finish: Counter[str] = Counter()
    hist = {name: Histogram() for name in HISTOGRAMS}
    errors: list[str] = []
    for part in reports:
        counts.update(part["counts"])
        rejected.update(part["rejected"])
        close_codes.update(part["close_codes"])
        finish.update(part["finish_reasons"])
        errors.extend(part["errors"])
        for name, wire in part["hist"].items():
            hist[name].merge_wire(wire)
    last_ns = max([r["last_delivery_ns"] for r in reports] + [0])
    first_ns = min([r["first_send_ns"] for r in reports if r["first_send_ns"]] or [t_go_ns])
    window_s = max(1e-9, (last_ns - first_ns) / 1e9) if last_ns > first_ns else None
    delivered = int(counts["delivered"])
    deltas = int(counts["deltas"])
    harness_cpu = sum(float(r["cpu_run_s"]) for r in reports) + coordinator_cpu_s
    measured_s = (end_ns - t_go_ns) / 1e9
    server_cpu = _sum_cpu(samples, "go", "end", config.server_pids)
    # The event loop's own thread: an asyncio server saturates when this nears 100%.
    loop_cpu = _sum_cpu(samples, "go", "end", config.server_pids, "loop_cpu_s")
    server_writes = _sum_cpu(samples, "go", "end", config.server_pids, "syscw")
    aux_cpu = _sum_cpu(samples, "go", "end", config.aux_pids)
    fanned = delivered + deltas  # frames the server fanned out that the harness counted
    rss_start = _sum_rss(samples, "start", config.server_pids)
    rss_idle = _sum_rss(samples, "idle", config.server_pids)
    connected = int(counts["connected"])
    latency: dict[str, Any] = {name: h.summary() for name, h in hist.items()}
    if config.provider_ttft_ms is not None and hist["ttft"].count:
        latency["ttft_added"] = hist["ttft"].summary(config.provider_ttft_ms)
    if config.provider_token_ms is not None and hist["gap"].count:
        latency["gap_added"] = hist["gap"].summary(config.provider_token_ms)
    defects = (
        int(counts["lost"])
        + int(counts["duplicated"])
        + int(counts["reordered"])
        + int(counts["deltas_lost"])
        + int(counts["deltas_duplicated"])
        + int(counts["replies_missing"])
    )
    failures = (
        int(counts["connect_failed"])
        + int(counts["disconnects"])
        + sum(rejected.values())
        + int(counts["unanswered"])
        + int(counts["rotate_failed"])
    )
    report: dict[str, Any] = {
        "label": config.label,
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": _cpus(), "python": platform.python_version()},
        "config": config.to_dict(),
        "phases_s": {"ramp": round(ramp_s, 3), "run_and_drain": round(measured_s, 3)},
        "connections": {
            "wanted": config.clients,
            "connected": connected,
            "failed": int(counts["connect_failed"]),
            "retries": int(counts["connect_retries"]),
            "disconnects_during_run": int(counts["disconnects"]),
            "close_codes": dict(close_codes),
        },
        "counts": {
            "sent": int(counts["sent"]),
            "acked": int(counts["acked"]),
            "ack_duplicates": int(counts["ack_duplicates"]),
            "rejected": dict(rejected),
            "unanswered": int(counts["unanswered"]),
            "skipped_window_full": int(counts["skipped_window_full"]),
            # flat out over several workers: sends that waited on another worker's members
            "sent_after_other_workers": int(counts["sent_after_other_workers"]),
            "expected_deliveries": int(counts["expected_deliveries"]),
            "delivered": delivered,
            "lost": int(counts["lost"]),
            "duplicated": int(counts["duplicated"]),
            "reordered": int(counts["reordered"]),
            "conversations_created": int(counts["conversations_created"]),
            "replies": {
                "started": int(counts["gen_starts"]),
                "expected": int(counts["replies_expected"]),
                "ended": int(counts["replies_ended"]),
                "missing": int(counts["replies_missing"]),
                "finish_reasons": dict(finish),
            },
            "deltas": {
                "delivered": deltas,
                "lost": int(counts["deltas_lost"]),
                "duplicated": int(counts["deltas_duplicated"]),
            },
            "defects": defects,
            "failures": failures,
        },
        "rates_per_s": {
            "window_s": round(window_s, 3) if window_s else None,
            "sent": round(counts["sent"] / window_s, 1) if window_s else None,
            "delivered": round(delivered / window_s, 1) if window_s else None,
            "deltas": round(deltas / window_s, 1) if window_s else None,
        },
        "latency_ms": latency,
        "harness": {
            "procs": config.procs,
            "cpu_s": round(harness_cpu, 3),
            "cpu_pct_of_one_core": round(100 * harness_cpu / measured_s, 1) if measured_s else None,
            "cpu_us_per_frame": _per(harness_cpu, fanned),
            "per_worker_cpu_s": [round(float(r["cpu_run_s"]), 3) for r in reports],
        },
        "server": {
            "pids": config.server_pids,
            "cpu_s": server_cpu,
            "cpu_pct_of_one_core": _per(server_cpu, 1, 100 / measured_s) if measured_s else None,
            "cpu_us_per_delivery": _per(server_cpu, fanned),
            "loop_thread_cpu_pct": (
                _per(loop_cpu, len(config.server_pids), 100 / measured_s) if measured_s else None
            ),
            "write_syscalls": None if server_writes is None else int(server_writes),
            "write_syscalls_per_delivery": _per(server_writes, fanned, 1),
            "rss_kib_start": rss_start,
            "rss_kib_idle": rss_idle,
            "rss_kib_end": _sum_rss(samples, "end", config.server_pids),
            "kib_per_connection": (
                round((rss_idle - rss_start) / connected, 2)
                if rss_idle is not None and rss_start is not None and connected
                else None
            ),
        },
        "aux": {
            "pids": config.aux_pids,
            "cpu_s": aux_cpu,
            "cpu_us_per_delivery": _per(aux_cpu, fanned),
        },
        "errors": errors[:20],
    }
    if redis is not None:  # --redis-info: what Redis did over the same span as the CPU
        report["redis"] = redis
    report["slo"] = check_slos(config, report)
    return report


def check_slos(config: LoadConfig, report: dict[str, Any]) -> dict[str, Any]:
    checks: list[dict[str, Any]] = []
    latency = report["latency_ms"]

    def check(name: str, value: float, limit: float) -> None:
        checks.append({"name": name, "value": value, "limit": limit, "ok": value <= limit})

    for quantile, limit in (
        ("p50", config.slo_p50_ms),
        ("p95", config.slo_p95_ms),
        ("p99", config.slo_p99_ms),
    ):
        if limit is None:
            continue
        names = REQUESTS + (("delivery",) if quantile == "p99" else ())
        for name in names:
            if latency[name]["count"]:
                check(f"{name} {quantile} ms", latency[name][quantile], limit)
    if config.slo_ttft_p99_ms is not None:
        check("ttft p99 ms", latency["ttft"]["p99"], config.slo_ttft_p99_ms)
        if config.mode == "ai" and not latency["ttft"]["count"]:
            check("ttft samples (none measured)", 1, 0)
    if config.max_loss is not None:
        check("lost+duplicated+reordered", report["counts"]["defects"], config.max_loss)
    if config.max_errors is not None:
        check(
            "failed connects, drops, refused or unanswered sends",
            report["counts"]["failures"],
            config.max_errors,
        )
    return {"checks": checks, "ok": all(c["ok"] for c in checks)}


def _cpus() -> int:
    import os

    return os.cpu_count() or 0


def summary_line(report: dict[str, Any]) -> str:
    """A one-line human summary for the end of a run."""
    counts = report["counts"]
    latency = report["latency_ms"]
    parts = [
        f"{report['connections']['connected']}/{report['connections']['wanted']} connected",
        f"sent {counts['sent']} acked {counts['acked']}",
        f"delivered {counts['delivered']}/{counts['expected_deliveries']}",
        f"lost {counts['lost']} dup {counts['duplicated']} reord {counts['reordered']}",
    ]
    rate = report["rates_per_s"].get("delivered")
    if rate:
        parts.append(f"{rate:.0f} deliveries/s")
    for name in ("ack", "delivery", "ttft", "gap"):
        if latency[name]["count"]:
            parts.append(f"{name} p50/p99 {latency[name]['p50']}/{latency[name]['p99']} ms")
    server = report["server"]
    if server["cpu_us_per_delivery"] is not None:
        parts.append(f"server {server['cpu_us_per_delivery']} µs/delivery")
    parts.append(f"harness cpu {report['harness']['cpu_pct_of_one_core']}%")
    parts.append("SLO ok" if report["slo"]["ok"] else "SLO MISSED")
    return " | ".join(parts)
