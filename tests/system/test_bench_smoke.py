"""Every benchmark scenario runs in --quick mode and writes a valid result.

The full scenarios (``make bench``) take minutes and their figures go to docs/benchmarks.md;
here each one runs its quick variant end to end (its servers, peers, Redis, the harness) and
must write ``<scenario>.json`` with its figures, its goals and the markdown block for the docs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.serverproc import REPO_ROOT

pytestmark = pytest.mark.timeout(240)


def _run(script: str, out: Path, *extra: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, f"bench/{script}", "--quick", "--out", str(out), *extra],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=220,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    name = script.removesuffix(".py").replace("_", "-")
    data: dict[str, Any] = json.loads((out / f"{name}.json").read_text())
    assert data["scenario"] == name and data["quick"] is True
    assert data["markdown"].strip()
    assert "2 cores shared" in data["machine"]["note"]
    return data


def test_connections(tmp_path: Path) -> None:
    data = _run("connections.py", tmp_path)
    for name in ("chatserver", "bare_aiohttp", "python_socketio"):
        assert data["kib_per_connection"][name] is not None, name
        assert data["runs"][name]["connections"]["connected"] == data["clients"]
    assert "KiB per idle connection" in data["markdown"]


def test_fanout(tmp_path: Path) -> None:
    data = _run("fanout.py", tmp_path)
    figures = data["figures"]
    assert set(figures) == {"chatserver", "bare_redis", "socketio_redis", "bare_single"}
    for name, phases in figures.items():
        for phase, f in phases.items():
            assert f["delivered"] == f["expected"] > 0, (name, phase)
            assert f["server_cpu_us_per_delivery"] is not None
    assert data["goals"]["chatserver_lost_duplicated_reordered"]["met"]
    assert data["server_cpu_split"]["chatserver"]["per_delivery_us"] is not None
    assert len(data["server_cpu_split"]["bare_redis"]["points"]) == 3  # 3 sizes, one line
    # chatserver runs on Redis and Postgres, the production shape: Postgres's CPU apart.
    assert figures["chatserver"]["flatout"]["postgres_cpu_us_per_message"] > 0
    assert "bare aiohttp + Redis" in data["markdown"]
    # Per message: the server's CPU and what Redis did (the targets on Redis).
    for name in ("chatserver", "bare_redis", "socketio_redis"):
        f = figures[name]["flatout"]
        assert f["server_cpu_us_per_message"] is not None, name
        assert f["redis_commands_per_message"] > 0 and f["redis_round_trips_per_message"] > 0
    assert figures["bare_single"]["flatout"]["redis_commands_per_message"] is None
    assert data["goals"]["cpu_per_message_vs_bare_redis"]["ratio"] is not None
    assert data["goals"]["cpu_per_message_small_vs_bare_redis"]["ratio"] is not None
    assert "Redis commands/message" in data["markdown"]


def test_ai(tmp_path: Path) -> None:
    data = _run("ai.py", tmp_path)
    for level in data["figures"].values():
        assert level["replies"] > 0 and level["defects"] == 0
        assert level["ttft_added_p50_ms"] is not None
        assert level["provider_alone_gap_added_p99_ms"] is not None
        # The floor beside it: the bare peer answered every message with the same provider.
        assert level["bare"]["replies"] > 0 and level["bare"]["defects"] == 0
        assert level["bare"]["ttft_added_p50_ms"] is not None
    assert "added gap p99" in data["markdown"]
    assert "| bare aiohttp |" in data["markdown"]
    assert set(data["both_goals_met_up_to"]) == {
        "chatserver",
        "bare_aiohttp",
        "production",
        "socketio",
    }
    # Production mode (2 instances on Redis and Postgres) and the python-socketio peer (2
    # processes on the same Redis, every reply frame an emit to the room), in the same run.
    for level in data["figures"].values():
        for name in ("production", "socketio"):
            f = level[name]
            assert f["replies"] > 0 and f["defects"] == 0, name
            assert f["ttft_added_p50_ms"] is not None and f["gap_added_p99_ms"] is not None
            assert f["redis"]["commands"] > 0 and f["redis"]["round_trips"] > 0, name
            assert f["redis_cpu_us_per_reply"] is not None, name
        assert level["production"]["redis"]["by_command"]["publish"] > 0
        assert level["socketio"]["redis"]["by_command"]["publish"] > 0
        assert level["production"]["postgres_cpu_us_per_reply"] is not None
        # At the goals' level, production then embedded once more (the opposite order):
        # the goal's ratio pools both runs of each.
        again = level["again"]
        assert again["production"]["replies"] > 0 and again["chatserver"]["replies"] > 0
        assert again["production"]["defects"] == again["chatserver"]["defects"] == 0
        # And production mode on one instance, all the load on it (not a goal).
        assert level["one_instance"]["replies"] > 0 and level["one_instance"]["defects"] == 0
    goals = data["production_goals"]
    assert goals["one_instance_cpu_per_reply_vs_embedded"] is not None
    assert goals["redis_commands_per_reply"]["value"] > 0
    cpu = goals["instance_cpu_per_reply_vs_embedded"]
    assert cpu["value"] is not None and len(cpu["pairs"]) == 2
    assert ", again |" in data["markdown"]
    assert goals["lost_duplicated_reordered"]["met"]
    assert "Redis commands per reply by command" in data["markdown"]
    assert data["git_commit"] != "unknown"


def test_writer_cpu(tmp_path: Path) -> None:
    data = _run("writer_cpu.py", tmp_path)
    figures = data["figures"]
    labels = list(figures)
    assert labels[0] == "outbox read + ack"
    assert any(label.startswith("store write") and "unnest" in label for label in labels)
    assert any(label.startswith("store write") and "COPY" in label for label in labels)
    assert labels[-1].startswith("raw COPY")
    for label, f in figures.items():
        # This process's CPU from its own clock; Redis's and Postgres's from /proc (ticks).
        assert f["client_us"] > 0 and f["server_us"] >= 0, label
    assert "this process" in data["markdown"]


def test_product_scale(tmp_path: Path) -> None:
    data = _run("product_scale.py", tmp_path)
    assert data["connected"] == 200
    assert data["conversations_created"] > 0 and data["replies"]["ended"] > 0
    assert data["defects"] == 0
    assert {c["name"] for c in data["slo"]["checks"]} >= {"ack p99 ms", "ttft p99 ms"}


@pytest.mark.heavy  # a soak and a traced one, most of a minute: started first
@pytest.mark.parametrize("mode", ["embedded", "production"])
def test_soak(tmp_path: Path, mode: str) -> None:
    data = _run("soak.py", tmp_path, "--modes", mode)
    assert set(data["modes"]) == {mode}
    assert data["goals"]["lost_duplicated"]["met"]
    for mode in data["modes"].values():
        assert mode["replies"] > 0 and mode["defects"] == 0
        for name, inst in mode["instances"].items():
            samples = inst["samples"]
            assert len(samples) >= 5, name  # every 1.5 s for 12 s
            assert all(s["rss_mib"] > 0 and s["allocated_blocks"] > 0 for s in samples)
            assert "conversation_cache" in samples[-1]["bounded"]
            assert inst["growth"]["rss_mib_per_min"] is not None, name
        assert mode["full_collection_after"], "a full collection after the load"
        traced = mode["sites_run"]["instances"]
        assert all(i["marked"] and i["sites"]["sites"] for i in traced.values())
    assert "Top allocation sites by growth" in data["markdown"]
    assert "RSS (MiB) by minute" in data["markdown"]


def test_run_collects_a_summary(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "bench/run.py",
            "--quick",
            "--only",
            "product-scale",
            "--out",
            str(tmp_path),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=220,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    summary = (tmp_path / "summary.md").read_text()
    assert "## product-scale (exit 0" in summary and "| ttft |" in summary


def test_loop_passes(tmp_path: Path) -> None:
    data = _run("loop_passes.py", tmp_path)
    names = (
        "chatserver tick-pipelined, the lane",
        "chatserver tick-pipelined, kept connections",
        "redis-py Redis",
    )
    for name in names:
        assert data["results"][name]["passes_mean"] >= 1, name
    assert "loop passes per round trip" in data["markdown"]


def test_idle(tmp_path: Path) -> None:
    data = _run("idle.py", tmp_path)
    processes = {
        "chatserver embedded": 1,
        "chatserver production": 2,
        "bare aiohttp": 1,
        "python-socketio": 2,
    }
    for name, count in processes.items():
        values = data["ms_per_s"][name]
        assert len(values) == count and all(v is not None and v >= 0 for v in values), name
    assert "CPU per process, ms a second" in data["markdown"]
