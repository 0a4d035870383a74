"""Gemini across instances: real server processes on one Redis, the fake Gemini server in
this test process.

- A ``cancel`` sent to the instance that does NOT stream the reply travels through the
  broker to the owner, whose producer task is cancelled: the fake sees the upstream HTTP
  connection close within 100 ms of the cancel leaving the client.
- The response cache lives in Redis: a first question answered on one instance is a hit on
  another.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from chatclient.client import ChatApi
from protocol import Delta, GenEnd, GenStart, Usage
from tests.fakegemini import FakeGemini, Stream

from .scaleout import connect, instances, token


@pytest.fixture
async def fake() -> AsyncIterator[FakeGemini]:
    server = FakeGemini(Stream(None, pace_s=0.002))
    await server.start()
    yield server
    await server.close()


def _env(fake: FakeGemini, transport: str) -> dict[str, str]:
    return {
        "CHAT_GEMINI_API_KEY": "test-key",
        "CHAT_GEMINI_BASE_URL": fake.base_url,
        "CHAT_GEMINI_TRANSPORT": transport,
    }


async def _conversation(url: str, owner: str, members: list[str]) -> str:
    async with aiohttp.ClientSession() as http:
        api = ChatApi(url, token(owner), http)
        return str((await api.create_conversation(members=members))["id"])


@pytest.mark.parametrize("transport", ["sse", "sdk"])
async def test_a_cancel_on_another_instance_closes_the_upstream_within_100ms(
    tmp_path: Path, redis_url: str, fake: FakeGemini, transport: str
) -> None:
    fake.script(Stream([f"w{i} " for i in range(500)], pace_s=0.01))
    with instances(tmp_path, redis_url, count=2, env=_env(fake, transport)) as (a, b):
        conv = await _conversation(a.url, "alice", ["bob"])
        alice = await connect(a, "alice")
        bob = await connect(b, "bob")
        try:
            await alice.join(conv)
            await bob.join(conv)
            await alice.send(conv, "tell me a long story about everything")  # A owns it
            # the first reply of an instance builds its Gemini client (the SDK's: seconds of
            # imports on a busy machine): wait for the stream, the cancel is what is timed
            start = await bob.expect(GenStart, timeout=30)
            await bob.expect(Delta, lambda d: d.seq >= 3, timeout=30)
            sent = time.monotonic()
            await bob.cancel(start.generation_id)  # sent to B, which does not stream it
            gone = await fake.wait_disconnect(0)
            elapsed = gone - sent
            assert elapsed < 0.1, f"upstream closed {1000 * elapsed:.0f} ms after the cancel"
            for client in (alice, bob):
                end = await client.expect(
                    GenEnd, lambda e: e.generation_id == start.generation_id, timeout=30
                )
                assert end.finish_reason == "cancelled"
                assert end.message is not None and end.message.text.startswith("w0 w1 w2 ")
            assert len(fake.requests) == 1 and fake.requests[0].chunks_sent < 500
        finally:
            await alice.close()
            await bob.close()


async def test_the_response_cache_is_shared_through_redis(
    tmp_path: Path, redis_url: str, fake: FakeGemini
) -> None:
    with instances(tmp_path, redis_url, count=2, env=_env(fake, "sse")) as (a, b):
        replies = []
        for server, user in ((a, "alice"), (b, "bob")):
            conv = await _conversation(server.url, user, [])
            client = await connect(server, user)
            try:
                await client.join(conv)
                ack = await client.send(conv, "What is compound interest?")
                replies.append(await client.reply(ack.message_id))
            finally:
                await client.close()
        first, second = (r.end for r in replies)
        assert first is not None and second is not None and second.message is not None
        assert len(fake.requests) == 1, "instance B answered from the cache A filled"
        assert second.usage == Usage(0, 0) and second.finish_reason == "stop"
        assert second.message.text == "You said: What is compound interest?"
