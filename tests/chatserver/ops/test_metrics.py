"""/metrics after real traffic, the periodic gauges, health and readiness in process."""

from __future__ import annotations

import asyncio
import re
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from chatclient.client import ChatError
from chatserver import keys
from chatserver.ops.metrics import Metrics
from chatserver.ops.observe import Sampler, sample_forever
from protocol import Encoding, ErrorFrame
from tests.chatserver.conftest import Harness, MakeHarness, eventually, outbox_drained

REPO = Path(__file__).resolve().parents[3]
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"

# What the issue lists, by exposed family name (counters without their _total suffix).
EXPECTED_FAMILIES = {
    "chat_connections": {"encoding"},
    "chat_connects": {"encoding"},
    "chat_disconnects": {"reason"},
    "chat_frames_in": {"type"},
    "chat_frames_out": {"type"},
    "chat_errors": {"code"},
    "chat_fanout_delay_seconds": set(),
    "chat_http_request_duration_seconds": {"route", "method", "status"},
    "chat_reply_first_token_seconds": {"agent", "model"},
    "chat_reply_duration_seconds": {"agent", "model"},
    "chat_replies": {"finish_reason"},
    "chat_tokens": {"model", "direction"},
    "chat_active_replies": set(),
    "chat_outbox_backlog": set(),
    "chat_persist_batch_size": set(),
    "chat_persist_batch_seconds": set(),
    "chat_messages_persisted": set(),
    "chat_window_hits": set(),
    "chat_window_misses": set(),
    "chat_event_loop_lag_seconds": set(),
    "chat_active_users": set(),
    "chat_conversations_created": set(),
    "chat_frame_handling_seconds": {"type"},
    # process and interpreter metrics
    "process_cpu_seconds": set(),
    "process_resident_memory_bytes": set(),
    "process_open_fds": set(),
    "python_info": {"implementation", "major", "minor", "patchlevel", "version"},
    "python_gc_collections": {"generation"},
}
# Registered, but with series only when there is something to report (a Postgres pool, a refusal).
DECLARED_ONLY = {
    "chat_db_pool_size",
    "chat_db_pool_in_use",
    "chat_db_pool_max",
    "chat_rate_limited",
}


async def scrape(harness: Harness) -> str:
    async with harness.http.get(harness.base_url + "/metrics") as resp:
        assert resp.status == 200
        assert resp.content_type == "text/plain"
        return await resp.text()


def families(text: str) -> dict[str, set[str]]:
    """Family name -> the label names its samples carry (le/quantile left out)."""
    out: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        labels = out.setdefault(family.name, set())
        for sample in family.samples:
            labels.update(k for k in sample.labels if k not in {"le", "quantile"})
    return out


def value(metrics: Metrics, name: str, **labels: str) -> float:
    got = metrics.registry.get_sample_value(name, labels)
    return 0.0 if got is None else got


def total(metrics: Metrics, name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels``."""
    return sum(
        sample.value
        for family in metrics.registry.collect()
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


async def drive_traffic(harness: Harness) -> tuple[str, str]:
    """Two users, both encodings: create, join, send, a reply, history, a bad frame."""
    conv = await harness.conversation("alice", members=["bob"])
    alice = await harness.connect("alice", Encoding.JSON)
    bob = await harness.connect("bob", Encoding.MSGPACK)
    await alice.join(conv)
    await bob.join(conv)
    ack = await alice.send(conv, "how long until the first token?")
    reply = await alice.reply(ack.message_id)
    assert reply.end is not None and reply.end.finish_reason == "stop"
    await bob.history(conv)
    await alice.send_raw('{"type": "nonsense"}')
    await alice.expect(ErrorFrame, lambda f: f.code == "unknown_type")
    api = await harness.api("carol")
    status, _ = await api.request("GET", "/api/conversations/nope/messages")
    assert status in (403, 404)
    carol = await harness.connect("carol")
    await carol.close()
    metrics = harness.app[keys.METRICS]
    await eventually(lambda: value(metrics, "chat_disconnects_total", reason="client") == 1)
    return conv, ack.message_id


async def test_exposition_carries_every_listed_metric(harness: Harness) -> None:
    await drive_traffic(harness)
    await outbox_drained(harness.app)
    metrics = harness.app[keys.METRICS]
    await eventually(lambda: value(metrics, "chat_messages_persisted_total") >= 2)
    await Sampler(harness.app).sample()
    text = await scrape(harness)
    found = families(text)
    for name, labels in EXPECTED_FAMILIES.items():
        assert name in found, f"{name} missing from /metrics"
        assert labels <= found[name], f"{name}: labels {found[name]}, expected {labels}"
    for name in DECLARED_ONLY:
        assert f"# TYPE {name}" in text, name
    assert 'chat_connections{encoding="json"} 1.0' in text
    assert 'chat_connections{encoding="msgpack"} 1.0' in text
    assert "chat_active_users 2.0" in text
    assert value(metrics, "chat_frames_in_total", type="send") == 1
    assert (
        value(metrics, "chat_frames_in_total", type="unknown")
        + value(metrics, "chat_frames_in_total", type="invalid")
        == 1
    )
    assert value(metrics, "chat_frames_out_total", type="hello") == 3
    assert value(metrics, "chat_errors_total", code="unknown_type") == 1
    assert value(metrics, "chat_conversations_created_total") == 1
    assert value(metrics, "chat_replies_total", finish_reason="stop") == 1
    assert total(metrics, "chat_tokens_total", direction="output") > 0
    assert total(metrics, "chat_tokens_total", direction="input") > 0
    assert total(metrics, "chat_reply_first_token_seconds_count", agent="general") == 1
    assert total(metrics, "chat_reply_duration_seconds_count", agent="general") == 1
    assert value(metrics, "chat_fanout_delay_seconds_count") >= 1
    assert value(metrics, "chat_frame_handling_seconds_count", type="send") == 1
    assert value(metrics, "chat_persist_batch_size_count") >= 1
    assert value(metrics, "chat_window_hits_total") + value(metrics, "chat_window_misses_total") > 0
    assert value(metrics, "chat_outbox_backlog") == 0
    created = {"route": "/api/conversations", "method": "POST", "status": "201"}
    assert value(metrics, "chat_http_request_duration_seconds_count", **created) == 1
    route = "/api/conversations/{conversation_id}/messages"
    failed = [
        s
        for f in text_string_to_metric_families(text)
        if f.name == "chat_http_request_duration_seconds"
        for s in f.samples
        if s.name.endswith("_count") and s.labels["route"] == route
    ]
    assert failed and all(s.labels["status"] in ("403", "404") for s in failed)
    assert value(metrics, "process_resident_memory_bytes") > 0


async def test_promtool_accepts_the_exposition(harness: Harness) -> None:
    await drive_traffic(harness)
    text = await scrape(harness)
    assert "chat_reply_first_token_seconds_bucket" in text and "process_cpu_seconds_total" in text
    code, problems = await promtool_check_metrics(text.encode())
    assert code == 0 and not problems.strip(), problems


async def promtool_check_metrics(exposition: bytes) -> tuple[int, str]:
    """``promtool check metrics`` on an exposition: its exit code and what it printed."""
    proc = await asyncio.create_subprocess_exec(
        PROMTOOL,
        "check",
        "metrics",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(exposition), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


def test_buckets_fit_a_chat_server() -> None:
    metrics = Metrics()
    reply = list(metrics.ttft._upper_bounds)
    assert reply[0] <= 0.05 and 60 <= reply[-2] < float("inf")  # ms to a minute and more
    assert 2 in reply and 1 in reply  # the alert thresholds fall on bucket bounds
    http = list(metrics.http_duration._upper_bounds)
    assert http[0] <= 0.001 and http[-2] >= 5
    lag = list(metrics.loop_lag._upper_bounds)
    assert lag[0] <= 0.001 and 0.1 in lag


def test_alert_rules_use_only_exposed_metric_names() -> None:
    """Every chat_* series the alerts query is a family this server registers."""
    text = Metrics().exposition().decode()
    declared = set(re.findall(r"^# TYPE (\S+) ", text, re.M))
    rules = (REPO / "deploy/prometheus/alerts.yml").read_text()
    used = set(re.findall(r"\b(chat_[a-z_]+)", rules))
    assert used
    for name in used:
        base = re.sub(r"_(bucket|count|sum)$", "", name)
        assert name in declared or base in declared, f"alerts.yml queries unknown {name}"


# -- the periodic gauges --------------------------------------------------------------------


async def test_window_hits_and_misses_follow_the_window(harness: Harness) -> None:
    metrics = harness.app[keys.METRICS]
    window: Any = harness.app[keys.WINDOW]  # both windows count hits and misses
    await drive_traffic(harness)
    await eventually(  # the app's own sampler (every second) catches up
        lambda: (
            value(metrics, "chat_window_hits_total") == window.hits
            and value(metrics, "chat_window_misses_total") == window.misses
        ),
        timeout=5,
    )
    assert window.hits > 0
    hits_before = window.hits
    window.hits = 0  # a window that restarts its counts
    sampler = Sampler(harness.app)
    await sampler.sample()
    await sampler.sample()
    assert value(metrics, "chat_window_hits_total") >= hits_before  # never goes backwards


async def test_outbox_backlog_is_sampled(harness: Harness) -> None:
    metrics = harness.app[keys.METRICS]
    outbox = harness.app[keys.OUTBOX]
    real = outbox.backlog

    async def seven() -> int:
        return 7

    outbox.backlog = seven  # type: ignore[method-assign]
    try:
        await Sampler(harness.app).sample()
        assert value(metrics, "chat_outbox_backlog") == 7
    finally:
        outbox.backlog = real  # type: ignore[method-assign]


async def test_event_loop_lag_is_measured(harness: Harness) -> None:
    metrics = harness.app[keys.METRICS]
    await eventually(lambda: value(metrics, "chat_event_loop_lag_seconds_count") > 0)
    late_before = value(metrics, "chat_event_loop_lag_seconds_count") - value(
        metrics, "chat_event_loop_lag_seconds_bucket", le="0.1"
    )
    time.sleep(0.4)  # block the loop, as a CPU-bound handler would  # noqa: ASYNC251
    await eventually(
        lambda: (
            value(metrics, "chat_event_loop_lag_seconds_count")
            - value(metrics, "chat_event_loop_lag_seconds_bucket", le="0.1")
            > late_before
        )
    )
    assert value(metrics, "chat_event_loop_lag_seconds_sum") >= 0.1


async def test_sqlite_reports_no_pool(harness: Harness) -> None:
    await Sampler(harness.app).sample()
    assert harness.app[keys.STORE].pool_stats() == {}
    assert "chat_db_pool_size{" not in await scrape(harness)


async def test_postgres_pool_use(make_harness: MakeHarness, postgres_dsn: str) -> None:
    harness = await make_harness(
        database_url=postgres_dsn, migrate="yes", pg_pool_min=2, pg_pool_max=7
    )
    metrics = harness.app[keys.METRICS]
    store: Any = harness.app[keys.STORE]
    await eventually(lambda: value(metrics, "chat_db_pool_max", pool="primary") == 7)
    assert value(metrics, "chat_db_pool_size", pool="primary") >= 2
    # hold three connections of the asyncpg pool: in use follows
    primary = store._primary
    held = [await primary.acquire() for _ in range(3)]
    try:
        sampler = Sampler(harness.app)
        await sampler.sample()
        assert value(metrics, "chat_db_pool_in_use", pool="primary") == 3
        assert value(metrics, "chat_db_pool_size", pool="primary") >= 3
    finally:
        for conn in held:
            await primary.release(conn)
    await sampler.sample()
    assert value(metrics, "chat_db_pool_in_use", pool="primary") == 0
    assert metrics.registry.get_sample_value("chat_db_pool_max", {"pool": "replica"}) is None


async def test_rate_limit_refusals_are_counted(make_harness: MakeHarness) -> None:
    harness = await make_harness(local_ttft_ms=1000, max_queued_replies=1)
    metrics = harness.app[keys.METRICS]
    conv = await harness.conversation("alice")
    alice = await harness.connect("alice")
    await alice.join(conv)
    codes = []
    for n in range(6):
        try:
            await alice.send(conv, f"burst {n}")
        except ChatError as exc:
            codes.append(exc.code)
    assert "rate_limited" in codes
    assert value(metrics, "chat_rate_limited_total", code="rate_limited") == codes.count(
        "rate_limited"
    )


# -- health and readiness ------------------------------------------------------------------


async def test_health_and_readiness_report_each_check(harness: Harness) -> None:
    async with harness.http.get(harness.base_url + "/api/health") as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body["status"] == "ok"
    assert {name: c["status"] for name, c in body["checks"].items()} == {
        "database": "ok",
        "redis": "ok",
        "ai": "ok",
    }
    async with harness.http.get(harness.base_url + "/readyz") as resp:
        assert resp.status == 200
        assert set((await resp.json())["checks"]) == {"database", "redis"}


async def test_readyz_is_503_while_draining_and_healthz_stays_up(harness: Harness) -> None:
    harness.app[keys.STATE].draining = True
    try:
        async with harness.http.get(harness.base_url + "/readyz") as resp:
            assert resp.status == 503
            assert (await resp.json())["status"] == "draining"
        async with harness.http.get(harness.base_url + "/healthz") as resp:
            assert resp.status == 200
    finally:
        harness.app[keys.STATE].draining = False


async def test_a_hung_dependency_answers_down_within_the_timeout(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    from chatserver.http import health

    monkeypatch.setattr(health, "CHECK_TIMEOUT_S", 0.2)
    store = harness.app[keys.STORE]

    async def hang() -> None:
        await asyncio.sleep(30)

    monkeypatch.setattr(store, "ping", hang)
    started = time.perf_counter()
    async with harness.http.get(harness.base_url + "/readyz") as resp:
        assert resp.status == 503
        body = await resp.json()
    assert time.perf_counter() - started < 2
    assert body["status"] == "degraded"
    assert body["checks"]["database"]["status"] == "down"
    assert "no answer within" in body["checks"]["database"]["error"]
    assert body["checks"]["redis"]["status"] == "ok"
    async with harness.http.get(harness.base_url + "/api/health") as resp:
        assert resp.status == 503


async def test_the_sampler_stops_when_cancelled_as_the_backlog_read_ends() -> None:
    """A shutdown's cancel that lands as the backlog read finishes ends the sampler; under
    Python 3.11's wait_for it was swallowed and the app's cleanup waited for ever."""
    release: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    reading = asyncio.Event()

    class Outbox:
        async def backlog(self) -> int:
            reading.set()
            await release
            return 7

    class BacklogOnly(Sampler):
        async def sample(self) -> None:
            await self._sample_backlog()

    app = web.Application()
    app[keys.METRICS] = Metrics()
    app[keys.OUTBOX] = Outbox()
    await _cancel_as_the_read_ends(BacklogOnly(app), reading, release)


async def test_the_sampler_stops_when_cancelled_as_the_job_stats_read_ends() -> None:
    """The same race on the reply jobs' gauges (their read had brought wait_for back)."""
    release: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    reading = asyncio.Event()

    class Jobs:
        async def stats(self) -> Any:
            reading.set()
            await release
            raise RuntimeError("never sampled: the cancel comes first")

    class Generation:
        jobs = Jobs()
        held: dict[str, Any] = {}

    class JobsOnly(Sampler):
        async def sample(self) -> None:
            await self._sample_jobs()

    app = web.Application()
    app[keys.METRICS] = Metrics()
    app[keys.GENERATION] = Generation()  # type: ignore[assignment]
    await _cancel_as_the_read_ends(JobsOnly(app), reading, release)


async def _cancel_as_the_read_ends(
    sampler: Sampler, reading: asyncio.Event, release: asyncio.Future[None]
) -> None:
    """Cancel the sampling loop in the very turn its read ends; it must stop, not go on."""
    task = asyncio.create_task(sample_forever(sampler, interval_s=0.01))
    await asyncio.wait_for(reading.wait(), 5)
    release.set_result(None)
    await asyncio.sleep(0)  # the read ends in this turn of the loop, the cancel right after it
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=5)
    outlived = task not in done
    while not task.done():  # a failure still leaves no sampler running
        task.cancel()
        await asyncio.wait({task}, timeout=1)
    assert not outlived and task.cancelled(), "the sampler outlived its cancel"


async def test_an_unusual_method_is_counted_as_other(harness: Harness) -> None:
    """A label value per method would be a series (and a child in memory) each: the parser
    takes some forty (WebDAV's among them), the label shows seven and "other"."""
    for method in ("PROPFIND", "PURGE", "GET"):
        async with harness.http.request(method, harness.base_url + "/api/agents") as resp:
            assert resp.status in (401, 405)
    metrics = harness.app[keys.METRICS]
    methods = {
        sample.labels["method"]
        for family in metrics.registry.collect()
        for sample in family.samples
        if sample.name == "chat_http_request_duration_seconds_count"
    }
    assert methods == {"GET", "other"}
    assert total(metrics, "chat_http_request_duration_seconds_count", method="other") == 2
