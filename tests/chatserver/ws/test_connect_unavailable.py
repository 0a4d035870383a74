"""A connection arriving while Redis is away (restarting, a cluster re-forming): its
per-user connection limit cannot be checked, and it is told so and when to come back,
never left with a dropped socket (1006)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import aiohttp
import pytest

from chatclient.client import ChatClient
from chatserver.auth import Authenticator
from protocol import CloseCode, ErrorCode
from tests.services import RedisServer

from ..conftest import MakeHarness

SECRET = "connect-unavailable-secret-" + "x" * 32


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A Redis of this test's own to stop (requested before the harness: closed after it)."""
    redis = RedisServer()
    redis.start()
    yield redis
    redis.close()


async def test_a_connection_whose_limit_cannot_be_checked_is_told_to_retry(
    own_redis: RedisServer, make_harness: MakeHarness
) -> None:
    harness = await make_harness(redis_url=own_redis.url, jwt_secret=SECRET)
    token = Authenticator(SECRET).issue("ann")
    own_redis.stop()
    async with harness.http.ws_connect(
        harness.ws_url,
        protocols=("chat.v1.json",),
        headers={"Authorization": f"Bearer {token}"},
    ) as ws:
        first = await ws.receive(timeout=30)  # after the Redis client's own retries
        assert first.type == aiohttp.WSMsgType.TEXT, first
        frame = json.loads(first.data)
        assert frame["type"] == "error" and frame["code"] == ErrorCode.UNAVAILABLE.value
        assert frame["retry_after_ms"] == 1000
        closing = await ws.receive(timeout=10)
        assert closing.type == aiohttp.WSMsgType.CLOSE
        assert ws.close_code == CloseCode.TRY_AGAIN_LATER == 1013
    own_redis.start()  # back (same port): the same user connects as told
    client = await ChatClient.connect(harness.ws_url, token, http=harness.http)
    assert client.hello is not None and client.hello.user_id == "ann"
    await client.close()
