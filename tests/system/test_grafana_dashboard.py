"""The Grafana dashboard (deploy/grafana/): its panels are the product's, compose provisions it,
and every query of every panel returns data from a real Prometheus (Debian's) scraping two
real instances (on Redis and Postgres, the model a fake Gemini server) under a small load.

Grafana itself is not run here (no package of it in Debian): its variable ``$__rate_interval``
is given the value Grafana would compute for a 1 s scrape interval and a short range, and each
query goes to Prometheus's HTTP API as Grafana would send it.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from chatclient.client import ChatApi, ChatClient
from protocol import Encoding, ErrorFrame
from tests.fakegemini import FakeGemini, Stream
from tests.serverproc import REPO_ROOT, ServerProc

from .scaleout import AUTH, instances
from .test_deploy import _compose_config, _services
from .test_prometheus import PROMETHEUS, Prometheus, prometheus, query

GRAFANA = REPO_ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "chatserver.json"
RATE_INTERVAL = "15s"  # Grafana: max(4 x scrape interval, step + scrape interval)
DEADLINE_S = 90.0
# The issue's list: each name must be a panel (its title), each panel one of the list.
PANELS = {
    "Request latency: REST",
    "Request latency: WebSocket frames",
    "Delivery latency",
    "Throughput",
    "Active connections",
    "Replies running and queued",
    "Model time to first token",
    "Tokens by model",
    "Errors by code",
    "Postgres pool use",
    "Redis health",
    "Outbox backlog",
    "Hit ratios",
}
CACHED_QUESTION = "What is a good name for a cat?"


def _dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def _panels() -> list[dict[str, Any]]:
    return [p for p in _dashboard()["panels"] if p["type"] != "row"]


def _targets() -> list[tuple[str, str]]:
    """(panel title: legend, the PromQL Grafana sends) for every query of every panel."""
    out = []
    for panel in _panels():
        for target in panel["targets"]:
            expr = target["expr"].replace("$__rate_interval", RATE_INTERVAL)
            assert "$" not in expr, f"{panel['title']}: a Grafana variable left in {expr}"
            out.append((f"{panel['title']}: {target.get('legendFormat', '')}", expr))
    return out


@pytest.fixture(autouse=True)
def _needs_prometheus() -> None:
    if not Path(PROMETHEUS).exists():
        pytest.fail(f"{PROMETHEUS} missing: run scripts/ensure-system-deps.sh", pytrace=False)


def test_the_dashboard_has_the_products_panels_and_is_provisioned() -> None:
    dashboard = _dashboard()
    assert dashboard["uid"] == "chatserver" and dashboard["schemaVersion"] >= 36
    assert {p["title"] for p in _panels()} == PANELS
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in _panels():
        assert panel["targets"], panel["title"]
        assert {t["refId"] for t in panel["targets"]} == {
            chr(65 + i) for i in range(len(panel["targets"]))
        }
        assert panel["datasource"] == {"type": "prometheus", "uid": "prometheus"}
        position = panel["gridPos"]
        assert position["x"] + position["w"] <= 24
    for quantiles in ("Request latency: REST", "Request latency: WebSocket frames"):
        panel = next(p for p in _panels() if p["title"] == quantiles)
        assert [t["legendFormat"] for t in panel["targets"]] == ["p50", "p95", "p99"]

    # the datasource the panels name, and the file provider (YAML, read for its few keys)
    datasources = (GRAFANA / "provisioning/datasources/prometheus.yml").read_text()
    assert re.search(r"^\s+uid: prometheus$", datasources, re.M)
    assert re.search(r"^\s+type: prometheus$", datasources, re.M)
    assert re.search(r"^\s+url: http://prometheus:9090$", datasources, re.M)
    providers = (GRAFANA / "provisioning/dashboards/chatserver.yml").read_text()
    assert re.search(r"^\s+type: file$", providers, re.M)
    found = re.search(r"^\s+path: (\S+)$", providers, re.M)
    assert found is not None
    dashboards_path = found.group(1)

    # compose mounts them where Grafana and the provider look
    done = _compose_config()
    assert done.returncode == 0, done.stderr
    grafana = _services(json.loads(done.stdout))["grafana"]
    mounts = {v["target"]: v.get("source") for v in grafana["volumes"]}
    assert mounts["/etc/grafana/provisioning/datasources"] == str(
        GRAFANA / "provisioning" / "datasources"
    )
    assert mounts["/etc/grafana/provisioning/dashboards"] == str(
        GRAFANA / "provisioning" / "dashboards"
    )
    assert mounts[dashboards_path] == str(GRAFANA / "dashboards")
    assert grafana["depends_on"]["prometheus"]["condition"] == "service_healthy"
    assert "healthcheck" in grafana


# -- every panel's queries return data -----------------------------------------------------


@pytest.fixture
async def gemini() -> AsyncIterator[FakeGemini]:
    server = FakeGemini(Stream(None, pace_s=0.002))  # echoes the question, a word a chunk
    await server.start()
    yield server
    await server.close()


def _token(user: str) -> str:
    return AUTH.issue(user, "enterprise", ttl_s=600)


async def _load(servers: list[ServerProc], stop: asyncio.Event) -> dict[str, int]:
    """A small load through both instances: a conversation of two members, each on one
    instance, asking in turn; new conversations opened with the same cacheable first question
    (a miss, then hits); REST calls; and now and then a bad frame (errors by code)."""
    done = {"replies": 0, "cached": 0, "errors": 0}
    async with aiohttp.ClientSession() as http:
        alice_api = ChatApi(servers[0].url, _token("alice"), http)
        conv = str((await alice_api.create_conversation(members=["bob"]))["id"])
        alice = await ChatClient.connect(servers[0].ws_url, _token("alice"), http=http)
        bob = await ChatClient.connect(
            servers[1].ws_url, _token("bob"), encoding=Encoding.MSGPACK, http=http
        )
        try:
            await alice.join(conv)
            await bob.join(conv)
            n = 0
            next_error = 0.0
            while not stop.is_set():
                asker, server = (alice, servers[0]) if n % 2 == 0 else (bob, servers[1])
                user = "alice" if asker is alice else "bob"
                ack = await asker.send(conv, f"{user} asks question number {n}")
                reply = await asker.reply(ack.message_id)
                assert reply.end is not None and reply.end.finish_reason == "stop"
                done["replies"] += 1
                api = ChatApi(server.url, _token(user), http)
                fresh = str((await api.create_conversation(agent_id="general"))["id"])
                await asker.join(fresh)
                ack = await asker.send(fresh, CACHED_QUESTION)
                reply = await asker.reply(ack.message_id)
                assert reply.end is not None and reply.end.finish_reason == "stop"
                await asker.leave(fresh)
                done["cached"] += 1
                if time.monotonic() >= next_error:  # well within the bad-frame allowance
                    next_error = time.monotonic() + 5
                    await asker.send_raw('{"type": "join", "conversation_id": "not-a-uuid"}')
                    await asker.expect(ErrorFrame)
                    done["errors"] += 1
                status, _ = await api.request("GET", "/api/conversations?limit=5")
                assert status == 200
                n += 1
                await asyncio.sleep(0.1)  # a small load: a few questions a second
        finally:
            await alice.close()
            await bob.close()
    return done


async def test_every_panel_query_returns_data_from_a_real_prometheus(
    tmp_path: Path, redis_url: str, postgres_dsn: str, gemini: FakeGemini
) -> None:
    env = {
        "CHAT_GEMINI_API_KEY": "test-key",
        "CHAT_GEMINI_BASE_URL": gemini.base_url,
        "CHAT_LIMITS_ENTERPRISE": "messages_per_minute=100000,connections=1000,"
        "daily_tokens=1000000000,requests_per_minute=100000,conversations=100000,"
        "conversations_per_minute=100000",
    }
    with (
        instances(tmp_path, redis_url, 2, env=env, database_url=postgres_dsn) as servers,
        prometheus(tmp_path / "prom", servers) as prom,
    ):
        stop = asyncio.Event()
        load = asyncio.create_task(_load(servers, stop))
        try:
            async with aiohttp.ClientSession() as http:
                await _every_query_answers(http, prom, load)
            stop.set()
            result = await load
        except BaseException:
            for server in servers:  # shown by pytest: what the instances said
                print(f"--- instance on port {server.port}:\n{server.output[-4000:]}")
            raise
        finally:
            stop.set()
            await asyncio.gather(load, return_exceptions=True)
        assert result["replies"] > 0 and result["cached"] > 1 and result["errors"] > 0


async def _every_query_answers(
    http: aiohttp.ClientSession, prom: Prometheus, load: asyncio.Task[dict[str, int]]
) -> None:
    waiting = dict(_targets())
    deadline = time.monotonic() + DEADLINE_S
    while waiting:
        if load.done():
            load.result()  # the load failed: its error, here
            raise AssertionError("the load stopped early")
        for name, expr in list(waiting.items()):
            series = await query(http, prom, expr)
            values = [float(s["value"][1]) for s in series]
            if any(math.isfinite(v) for v in values):
                del waiting[name]
        if waiting and time.monotonic() > deadline:
            raise AssertionError(
                f"no data within {DEADLINE_S} s for: {json.dumps(waiting, indent=1)}\n"
                f"{prom.log_path.read_text()[-2000:]}"
            )
        await asyncio.sleep(0.5)
