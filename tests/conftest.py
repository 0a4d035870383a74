"""Shared fixtures: throwaway Redis and Postgres servers, started lazily, one per session.

- ``redis_server``: a :class:`tests.services.RedisServer` (``.url``, ``.port``, ``stop()``,
  ``start()``, ``kill()``, ``flushall()``).
- ``postgres_server``: a :class:`tests.services.PostgresServer` (``.dsn``, ``.port``,
  ``create_database(name) -> dsn``, ``drop_database(name)``, ``stop()``, ``start()``).
- ``redis_url``: the session server, running and flushed, for one test.
- ``postgres_dsn``: a fresh database for one test, dropped afterwards.
"""

from __future__ import annotations

import itertools
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

# the repository root, so `tests.services` imports however pytest was started
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.services import PostgresServer, RedisServer, ServiceError

_db_counter = itertools.count(1)
S = TypeVar("S", RedisServer, PostgresServer)


def _launch(make: Callable[[], S]) -> S:
    """Create and start a server; a missing binary or a failed start fails with its reason."""
    server: S | None = None
    try:
        server = make()
        server.start()
    except ServiceError as exc:
        reason = str(exc)
        if server is not None:
            server.close()
    else:
        return server
    pytest.fail(reason, pytrace=False)  # outside `except`: no chained traceback


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = _launch(RedisServer)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    server = _launch(PostgresServer)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """DB 0 of the session server, empty; restarted first if an earlier test stopped it."""
    redis_server.start()
    redis_server.flushall()
    return redis_server.url


@pytest.fixture
def postgres_dsn(postgres_server: PostgresServer, request: pytest.FixtureRequest) -> Iterator[str]:
    """A database of its own for this test (``CREATE DATABASE``), dropped after it."""
    postgres_server.start()
    slug = re.sub(r"[^a-z0-9]+", "_", request.node.name.lower()).strip("_")[:40]
    name = f"t{next(_db_counter)}_{slug}"
    dsn = postgres_server.create_database(name)
    yield dsn
    if postgres_server.running:
        postgres_server.drop_database(name)
