"""/api/health and /readyz of a real server process while Redis or Postgres is stopped.

The server runs as in production: ``chatserver serve --redis-url ... --database-url ...
--migrate yes``. Stopping a dependency turns both endpoints 503 (the JSON names the check that
is down, the others stay ok) and starting it again brings them back to 200, with no restart
of the server. /healthz (liveness) stays 200 throughout: a dependency outage must not make
the orchestrator kill healthy processes.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.serverproc import ServerProc
from tests.services import PostgresServer, RedisServer

from .scaleout import SECRET

DEADLINE_S = 30.0


def get(server: ServerProc, path: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(server.url + path, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def wait_for(server: ServerProc, status: int, down: str | None) -> dict[str, dict[str, Any]]:
    """Poll both endpoints until they answer ``status`` with check ``down`` down (or none)."""
    deadline = time.monotonic() + DEADLINE_S
    while True:
        answers = {path: get(server, path) for path in ("/api/health", "/readyz")}
        downs = {
            path: {n for n, c in body.get("checks", {}).items() if c["status"] != "ok"}
            for path, (_, body) in answers.items()
        }
        expected = {down} if down else set()
        if all(code == status for code, _ in answers.values()) and all(
            d == expected for d in downs.values()
        ):
            return {path: body for path, (_, body) in answers.items()}
        if time.monotonic() > deadline:
            raise AssertionError(
                f"expected {status} with {down or 'nothing'} down; got {answers}\n"
                f"{server.output[-3000:]}"
            )
        time.sleep(0.1)


def liveness(server: ServerProc) -> int:
    return get(server, "/healthz")[0]


@pytest.fixture
def server(tmp_path: Path, redis_url: str, postgres_dsn: str) -> Iterator[ServerProc]:
    args = ["--redis-url", redis_url, "--database-url", postgres_dsn, "--migrate", "yes"]
    # As in production: a secret (dev auth mode is refused with Redis); no client needs one.
    env = {"CHAT_LOG_LEVEL": "warning", "CHAT_JWT_SECRET": SECRET}
    proc = ServerProc(tmp_path, env=env, args=args)
    proc.start()
    try:
        yield proc
    finally:
        proc.close()


def test_redis_stopped_turns_health_and_readiness_503_and_back(
    server: ServerProc, redis_server: RedisServer
) -> None:
    healthy = wait_for(server, 200, None)
    assert healthy["/api/health"]["checks"]["redis"]["backend"] == "redis"
    assert healthy["/api/health"]["checks"]["database"]["backend"] == "postgres"
    redis_server.stop()
    try:
        down = wait_for(server, 503, "redis")
        assert down["/api/health"]["status"] == "degraded"
        assert down["/api/health"]["checks"]["redis"]["error"]
        assert down["/readyz"]["checks"]["database"]["status"] == "ok"
        assert liveness(server) == 200
    finally:
        redis_server.start()
    wait_for(server, 200, None)


def test_postgres_stopped_turns_health_and_readiness_503_and_back(
    server: ServerProc, postgres_server: PostgresServer
) -> None:
    healthy = wait_for(server, 200, None)
    assert healthy["/api/health"]["checks"]["database"]["backend"] == "postgres"
    postgres_server.stop()
    try:
        down = wait_for(server, 503, "database")
        assert down["/api/health"]["checks"]["database"]["error"]
        assert down["/readyz"]["checks"]["redis"]["status"] == "ok"
        assert liveness(server) == 200
    finally:
        postgres_server.start()
    wait_for(server, 200, None)
