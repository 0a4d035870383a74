"""Fixtures for in-process server tests: a real app on a real socket, real clients."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from redis.asyncio import Redis

from chatclient.client import ChatApi, ChatClient
from chatserver import keys
from chatserver.app import create_app
from chatserver.generation.buffer import MemoryReplyBuffer, ReplyBuffer
from chatserver.generation.redis_buffer import RedisReplyBuffer
from chatserver.redis_ticks import TickPipelinedRedis
from chatserver.settings import Settings
from protocol import Encoding
from storage.redis_keys import instance_alive_key


@dataclass
class Harness:
    """A running app and helpers to reach it as different users."""

    server: TestServer
    app: web.Application
    http: aiohttp.ClientSession
    clients: list[ChatClient] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return str(self.server.make_url("/")).rstrip("/")

    @property
    def ws_url(self) -> str:
        return self.base_url.replace("http", "ws", 1) + "/ws"

    async def token(self, user_id: str, tier: str = "free") -> str:
        return await ChatApi(self.base_url, None, self.http).dev_token(user_id, tier)

    async def api(self, user_id: str, tier: str = "free") -> ChatApi:
        return ChatApi(self.base_url, await self.token(user_id, tier), self.http)

    async def connect(
        self,
        user_id: str,
        encoding: Encoding = Encoding.JSON,
        auth: str = "header",
        tier: str = "free",
    ) -> ChatClient:
        client = await ChatClient.connect(
            self.ws_url, await self.token(user_id, tier), encoding=encoding, auth=auth
        )
        self.clients.append(client)
        return client

    async def conversation(self, owner: str, members: list[str] | None = None, **kw: Any) -> str:
        api = await self.api(owner)
        return str((await api.create_conversation(members=members, **kw))["id"])


MakeHarness = Callable[..., Awaitable[Harness]]


async def stop_instance(harness: Harness, survivor: Harness) -> None:
    """What an instance's death comes to for the others: its upkeep stops (its app closed:
    a heartbeat of its own would set its alive key again), then its lease runs out (its
    alive key deleted, through ``survivor``'s Redis client)."""
    server_id = harness.app[keys.SETTINGS].server.server_id
    await harness.server.close()
    await survivor.app[keys.REDIS].delete(instance_alive_key("chat", server_id))


UNLIMITED = "messages_per_minute=1000000,connections=10000,daily_tokens=1000000000"


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings.of(
        port=0,
        sqlite_path=str(tmp_path / "chat.sqlite3"),
        local_ttft_ms=5,
        local_token_ms=2,
        heartbeat_s=30,
        shutdown_grace_s=2,
        # Limits have their own tests; elsewhere a burst of sends must not trip them.
        limits_free=UNLIMITED,
        max_queued_replies=1000,
        frames_per_second=100_000,
    )


@pytest.fixture(params=["memory", "redis", "redis-ticked"])
async def buffer(request: pytest.FixtureRequest) -> AsyncIterator[ReplyBuffer]:
    """A resume buffer of each kind (the Redis one on the test's own Redis, with a plain
    client and with the per-tick pipelining one the server uses)."""
    if request.param == "memory":
        yield MemoryReplyBuffer()
        return
    client = TickPipelinedRedis if request.param == "redis-ticked" else Redis
    redis = client.from_url(request.getfixturevalue("redis_url"))
    yield RedisReplyBuffer(redis, server_id="server-a", lease_s=5)
    await redis.aclose()


@pytest.fixture
async def make_harness(settings: Settings) -> AsyncIterator[MakeHarness]:
    made: list[Harness] = []

    async def make(**overrides: Any) -> Harness:
        if ("redis_url" in overrides or "database_url" in overrides) and (
            "jwt_secret" not in overrides
        ):
            # The harness hands out tokens from /api/dev/token: with Redis or Postgres that
            # dev auth mode must be allowed explicitly, as a deployment would have to.
            overrides = {"allow_dev_auth": True, **overrides}
        app = create_app(settings.with_overrides(**overrides) if overrides else settings)
        server = TestServer(app)
        await server.start_server()
        harness = Harness(server, app, aiohttp.ClientSession())
        made.append(harness)
        return harness

    yield make
    for harness in reversed(made):
        for client in harness.clients:
            await client.close()
        await harness.http.close()
        await harness.server.close()


@pytest.fixture
async def harness(make_harness: MakeHarness) -> Harness:
    return await make_harness()


@pytest.fixture(params=[Encoding.JSON, Encoding.MSGPACK], ids=["json", "msgpack"])
def encoding(request: pytest.FixtureRequest) -> Encoding:
    return request.param  # type: ignore[no-any-return]


async def eventually(
    condition: Callable[[], bool | Awaitable[bool]], timeout: float = 5.0, what: str = ""
) -> None:
    """Wait until ``condition`` holds, polling it, failing after ``timeout`` seconds.

    For state with no event to await (a buffer drained, a gauge moved); never a fixed wait.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = condition()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            raise AssertionError(f"condition not reached within {timeout} s {what}")
        await asyncio.sleep(0.005)


async def outbox_drained(app: web.Application) -> None:
    from chatserver import keys

    outbox = app[keys.OUTBOX]

    async def empty() -> bool:
        return await outbox.backlog() == 0

    await eventually(empty, what="(outbox backlog)")
