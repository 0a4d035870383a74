"""Fixtures that run each storage conformance suite against every implementation.

Adding an implementation (Redis, Postgres) means one entry in the matching factory dict: the
fixtures are parametrized over the dict's keys, so every conformance test then runs on it too.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pytest
from redis.asyncio import Redis, RedisCluster

from protocol import Message, timestamp_from_ms
from storage import MemoryOutbox, MemoryWindow, SqliteStore
from storage.jobs.base import ReplyJobs
from storage.jobs.memory import MemoryReplyJobs
from storage.jobs.redis import RedisReplyJobs
from storage.outbox.base import Outbox
from storage.outbox.redis import RedisOutbox
from storage.store.base import Store
from storage.store.postgres import PostgresStore
from storage.window.base import HotWindow
from storage.window.redis import RedisWindow
from tests.services import PostgresServer


class StoreMaker(Protocol):
    def __call__(self) -> Store: ...


def _postgres(tmp: Path, *, dsn: str, pgbouncer: bool = False) -> StoreMaker:
    return lambda: PostgresStore(dsn, migrate=True, pool_min=1, pool_max=4, pgbouncer=pgbouncer)


# name -> (tmp_path -> a maker of stores that all open the SAME backing database). A factory
# named in STORE_DSN_FIXTURES also gets ``dsn=`` the value of that fixture (its own database).
STORE_FACTORIES: dict[str, Callable[..., StoreMaker]] = {
    "sqlite": lambda tmp: lambda: SqliteStore(str(tmp / "chat.db")),
    "postgres": _postgres,
    "postgres-pgbouncer": lambda tmp, *, dsn: _postgres(tmp, dsn=dsn, pgbouncer=True),
}
STORE_DSN_FIXTURES: dict[str, str] = {
    "postgres": "postgres_dsn",
    "postgres-pgbouncer": "pgbouncer_dsn",
}


@contextlib.asynccontextmanager
async def _postgres_stopped(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    """The test's Postgres server stopped (every connection gone, none taken), then started."""
    server: PostgresServer = request.getfixturevalue("postgres_server")
    await asyncio.to_thread(server.stop)
    try:
        yield
    finally:
        await asyncio.to_thread(server.start)


# name -> (the test's request -> an async context in which the backing server of that
# implementation is gone). SQLite has no server to lose. Behind PgBouncer a query waits for a
# server connection until the store's command timeout (10 s, twice: ~20 s per ping), so that
# variant is left out to keep the suite short; the direct one shows the store's part.
STORE_OUTAGES: dict[
    str, Callable[[pytest.FixtureRequest], contextlib.AbstractAsyncContextManager[None]]
] = {
    "postgres": _postgres_stopped,
}


@dataclass
class RedisClients:
    """Clients of one test's Redis (a single server or a cluster), closed after the test.

    Factories of Redis-backed implementations get one as ``services=``; see SERVICE_FIXTURES.
    """

    url: str
    cluster: bool
    made: list[Redis | RedisCluster] = field(default_factory=list)

    def new(self, **options: Any) -> Redis | RedisCluster:
        """A client of its own; ``options`` go to ``from_url`` (``client_name``, say)."""
        client: Redis | RedisCluster = (
            RedisCluster.from_url(self.url, **options)
            if self.cluster
            else Redis.from_url(self.url, **options)
        )
        self.made.append(client)
        return client

    async def aclose(self) -> None:
        for client in self.made:
            await client.aclose()
        self.made.clear()


# name -> the fixture (a Redis URL) whose server a factory of that name needs: such a factory
# gets ``services=RedisClients(...)`` besides its options.
SERVICE_FIXTURES: dict[str, tuple[str, bool]] = {
    "redis": ("redis_url", False),
    "redis-cluster": ("redis_cluster_url", True),
}


def _services(request: pytest.FixtureRequest) -> RedisClients | None:
    spec = SERVICE_FIXTURES.get(request.param)
    if spec is None:
        return None
    return RedisClients(request.getfixturevalue(spec[0]), cluster=spec[1])


def _redis_outbox(
    *, services: RedisClients, max_entries: int = 100_000, **options: Any
) -> RedisOutbox:
    shards = 3 if services.cluster else 1
    return RedisOutbox(
        services.new(),
        consumer=f"test-{uuid.uuid4().hex[:8]}",
        max_entries=max_entries,
        shards=shards,
        **options,
    )


# name -> (**options -> outbox). Options: max_entries.
OUTBOX_FACTORIES: dict[str, Callable[..., Outbox]] = {
    "memory": lambda *, max_entries=100_000: MemoryOutbox(max_entries=max_entries),
    "redis": _redis_outbox,
    "redis-cluster": _redis_outbox,
}


def _memory_window(
    *,
    size: int = 200,
    idempotency_ttl_s: float = 86400,
    max_conversations: int = 100_000,
    outbox_max_entries: int = 100_000,
) -> tuple[HotWindow, Outbox]:
    window = MemoryWindow(
        size=size, idempotency_ttl_s=idempotency_ttl_s, max_conversations=max_conversations
    )
    return window, MemoryOutbox(max_entries=outbox_max_entries)


def _redis_window(
    *,
    services: RedisClients,
    size: int = 200,
    idempotency_ttl_s: float = 86400,
    outbox_max_entries: int = 100_000,
) -> tuple[HotWindow, Outbox]:
    window = RedisWindow(
        services.new(), size=size, idempotency_ttl_s=idempotency_ttl_s, cluster=services.cluster
    )
    return window, _redis_outbox(services=services, max_entries=outbox_max_entries)


# name -> (**options -> (window, the outbox it appends to)). A window and its outbox come as a
# pair because a production window appends to its own outbox in the same atomic step.
# Options: size, idempotency_ttl_s, outbox_max_entries; max_conversations (memory only).
WINDOW_FACTORIES: dict[str, Callable[..., tuple[HotWindow, Outbox]]] = {
    "memory": _memory_window,
    "redis": _redis_window,
    "redis-cluster": _redis_window,
}


@pytest.fixture(params=sorted(STORE_FACTORIES))
def store_maker(request: pytest.FixtureRequest, tmp_path: Path) -> StoreMaker:
    """Makes unstarted stores on one backing database (for close/reopen tests)."""
    fixture = STORE_DSN_FIXTURES.get(request.param)
    if fixture is None:
        return STORE_FACTORIES[request.param](tmp_path)
    return STORE_FACTORIES[request.param](tmp_path, dsn=request.getfixturevalue(fixture))


@pytest.fixture
async def store(store_maker: StoreMaker) -> AsyncIterator[Store]:
    s = store_maker()
    await s.start()
    yield s
    await s.close()


MakeOutbox = Callable[..., Awaitable[Outbox]]
MakeWindow = Callable[..., Awaitable[tuple[HotWindow, Outbox]]]


@pytest.fixture(params=sorted(OUTBOX_FACTORIES))
async def make_outbox(request: pytest.FixtureRequest) -> AsyncIterator[MakeOutbox]:
    made: list[Outbox] = []
    services = _services(request)
    extra = {} if services is None else {"services": services}

    async def make(**options: Any) -> Outbox:
        box = OUTBOX_FACTORIES[request.param](**extra, **options)
        await box.start()
        made.append(box)
        return box

    yield make
    for box in made:
        await box.close()
    if services is not None:
        await services.aclose()


@pytest.fixture
async def outbox(make_outbox: MakeOutbox) -> Outbox:
    return await make_outbox()


@pytest.fixture(params=sorted(WINDOW_FACTORIES))
async def make_window(request: pytest.FixtureRequest) -> AsyncIterator[MakeWindow]:
    made: list[tuple[HotWindow, Outbox]] = []
    services = _services(request)
    extra = {} if services is None else {"services": services}

    async def make(**options: Any) -> tuple[HotWindow, Outbox]:
        pair = WINDOW_FACTORIES[request.param](**extra, **options)
        await pair[1].start()
        await pair[0].start()
        made.append(pair)
        return pair

    yield make
    for window, box in made:
        await window.close()
        await box.close()
    if services is not None:
        await services.aclose()


@pytest.fixture
async def window_pair(make_window: MakeWindow) -> tuple[HotWindow, Outbox]:
    return await make_window()


@pytest.fixture
def window(window_pair: tuple[HotWindow, Outbox]) -> HotWindow:
    return window_pair[0]


@pytest.fixture(params=sorted(SERVICE_FIXTURES))
async def redis_clients(request: pytest.FixtureRequest) -> AsyncIterator[RedisClients]:
    """Clients of a flushed single Redis and of a flushed Redis Cluster (the Redis-only tests)."""
    services = _services(request)
    assert services is not None
    yield services
    await services.aclose()


class MessageFactory:
    """Builds stored-shape messages with contiguous offsets per conversation.

    User messages default to user ``u1``, assistant messages to agent ``a1``.
    """

    def __init__(self) -> None:
        self._offsets: dict[str, int] = {}
        self._ms = 1_700_000_000_000

    def __call__(self, conversation_id: str, *, role: str = "user", **fields: Any) -> Message:
        offset = fields.pop("offset", self._offsets.get(conversation_id, 0) + 1)
        self._offsets[conversation_id] = max(offset, self._offsets.get(conversation_id, 0))
        self._ms += 1
        if role == "user":
            fields.setdefault("user_id", "u1")
        elif role == "assistant":
            fields.setdefault("agent_id", "a1")
        fields.setdefault("text", f"message {offset}")
        fields.setdefault("created_at", timestamp_from_ms(self._ms))
        return Message(
            id=str(uuid.uuid4()),
            conversation_id=conversation_id,
            offset=offset,
            role=role,
            **fields,
        )


@pytest.fixture
def new_message() -> MessageFactory:
    return MessageFactory()


# -- reply jobs ------------------------------------------------------------------------

# A test's jobs: ``make(holder)`` is one instance's view; ``die(old, new, unfinished)``
# makes ``old``'s unfinished jobs claimable by ``new`` the way each implementation does it:
# in process, a restart recovers them from the store; in Redis, ``old``'s liveness runs out.
JOB_LEASE_S = 30.0


@dataclass
class JobsHarness:
    make: Callable[[str], Awaitable[ReplyJobs]]
    die: Callable[[ReplyJobs, ReplyJobs, list[Message]], Awaitable[None]]


async def _recover(old: ReplyJobs, new: ReplyJobs, unfinished: list[Message]) -> None:
    assert isinstance(new, MemoryReplyJobs)
    new.recover(unfinished)


async def _lease_runs_out(old: ReplyJobs, new: ReplyJobs, unfinished: list[Message]) -> None:
    # What the others see of a holder that stopped renewing, once its lease ran out.
    assert isinstance(old, RedisReplyJobs)
    await old.redis.delete(old.alive_key)


@pytest.fixture(params=["memory", "redis", "redis-cluster"])
async def jobs_harness(request: pytest.FixtureRequest) -> AsyncIterator[JobsHarness]:
    services = _services(request)
    made: list[ReplyJobs] = []

    async def make(holder: str) -> ReplyJobs:
        jobs: ReplyJobs
        if services is None:
            jobs = MemoryReplyJobs()
        else:
            jobs = RedisReplyJobs(
                services.new(), holder=holder, lease_s=JOB_LEASE_S, cluster=services.cluster
            )
        await jobs.start()
        made.append(jobs)
        return jobs

    yield JobsHarness(make, _recover if services is None else _lease_runs_out)
    for jobs in made:
        await jobs.close()
    if services is not None:
        await services.aclose()
