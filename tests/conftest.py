"""Shared fixtures: throwaway Redis and Postgres servers, started lazily, one per session.

- ``redis_server``: a :class:`tests.services.RedisServer` (``.url``, ``.port``, ``stop()``,
  ``start()``, ``kill()``, ``flushall()``).
- ``postgres_server``: a :class:`tests.services.PostgresServer` (``.dsn``, ``.port``,
  ``create_database(name) -> dsn``, ``drop_database(name)``, ``stop()``, ``start()``).
- ``redis_cluster``: a :class:`tests.services.RedisClusterServer` (three masters; ``.url``,
  ``.nodes``, ``flushall()``); ``redis_cluster_url``: it, flushed, for one test.
- ``redis_url``: the session server, running and flushed, for one test.
- ``postgres_dsn``: a fresh database for one test, dropped afterwards.
- ``pgbouncer``: a :class:`tests.services.PgBouncer` (transaction mode) in front of
  ``postgres_server``; ``pgbouncer_dsn``: the test's ``postgres_dsn`` database through it.
- ``postgres_replica``: a :class:`tests.services.PostgresReplica` of ``postgres_server``
  (streaming, hot standby), made for one test; ``.dsn_for(name)``.
"""

from __future__ import annotations

import itertools
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

# the repository root, so `tests.services` imports however pytest was started
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.services import (
    PgBouncer,
    PostgresReplica,
    PostgresServer,
    RedisClusterServer,
    RedisServer,
    ServiceError,
)

_db_counter = itertools.count(1)
S = TypeVar("S", RedisServer, PostgresServer, RedisClusterServer)


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


# Test modules whose tests share one costly module fixture (the image build): each is one work
# unit for pytest-xdist, so that one worker runs all its tests and builds once. Every other
# test is a unit of its own. (xdist's own `xdist_group` marks do not reach its scheduler under
# pytest 9: it renames `item._nodeid`, which pytest 9 no longer reads.)
SHARED_MODULES = frozenset({"tests/system/test_image.py"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The ``heavy`` tests first (a stable sort: the rest keep their order). On xdist workers
    (``make test``) they then start at once, on workers of their own, beside the many short
    ones."""
    items.sort(key=lambda item: item.get_closest_marker("heavy") is None)


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    from xdist.scheduler import LoadScopeScheduling

    class Scheduler(LoadScopeScheduling):  # type: ignore[misc]
        """One unit per test, one per module of SHARED_MODULES; units go out in collection
        order (the units of most tests first), at most two waiting on each worker."""

        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return module if module in SHARED_MODULES else nodeid

    return Scheduler(config, log)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = _launch(RedisServer)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterServer]:
    """A three-master Redis Cluster (``.url``, ``.nodes``, ``flushall()``) for the session."""
    server = _launch(RedisClusterServer)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def redis_cluster_url(redis_cluster: RedisClusterServer) -> str:
    """The session cluster, every node flushed, for one test."""
    redis_cluster.flushall()
    return redis_cluster.url


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


@pytest.fixture(scope="session")
def pgbouncer(postgres_server: PostgresServer) -> Iterator[PgBouncer]:
    postgres_server.start()
    bouncer: PgBouncer | None = None
    try:
        bouncer = PgBouncer(postgres_server)
        bouncer.start()
    except ServiceError as exc:
        if bouncer is not None:
            bouncer.close()
        pytest.fail(str(exc), pytrace=False)
    try:
        yield bouncer
    finally:
        bouncer.close()


@pytest.fixture
def pgbouncer_dsn(postgres_dsn: str, pgbouncer: PgBouncer) -> str:
    """The test's own database (``postgres_dsn``), reached through PgBouncer."""
    pgbouncer.start()
    return pgbouncer.dsn_for(postgres_dsn.rsplit("/", 1)[1])


@pytest.fixture
def postgres_replica(postgres_server: PostgresServer) -> Iterator[PostgresReplica]:
    """A fresh streaming replica of the session server for one test, started."""
    postgres_server.start()
    replica: PostgresReplica | None = None
    try:
        replica = PostgresReplica(postgres_server)
        replica.start()
    except ServiceError as exc:
        if replica is not None:
            replica.close()
        pytest.fail(str(exc), pytrace=False)
    try:
        yield replica
    finally:
        replica.close()
