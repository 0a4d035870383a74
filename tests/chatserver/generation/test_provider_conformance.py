"""One conformance suite for every model provider.

``gemini`` (google-genai) and ``gemini-sse`` (the lean path) run against the fake Gemini
server (tests/fakegemini.py) over real HTTP: the same suite, the same fake.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from chatserver.generation.gemini import GeminiProvider
from chatserver.generation.gemini_common import GeminiConfig, RetryPolicy
from chatserver.generation.gemini_sse import GeminiSseProvider
from chatserver.generation.local import LocalProvider
from chatserver.generation.provider import Chunk, Finish, Provider, ReplyRequest, StreamItem
from protocol import Message, Usage
from tests.fakegemini import FakeGemini, Stream


def _request(text: str, max_output_tokens: int = 1024) -> ReplyRequest:
    message = Message("m1", "c1", 1, "user", text, "2026-01-01T00:00:00.000Z", user_id="u")
    return ReplyRequest(
        "general", "gemini-2.5-flash", "Be brief.", (message,), 0.7, max_output_tokens
    )


@pytest.fixture(params=["local", "gemini", "gemini-sse"])
async def provider(request: pytest.FixtureRequest) -> AsyncIterator[Provider]:
    fake: FakeGemini | None = None
    made: Provider
    if request.param == "local":
        made = LocalProvider(ttft_ms=5, token_ms=2)
    else:
        fake = FakeGemini(Stream(None, pace_s=0.002))  # echoes the question word by word
        config = GeminiConfig("test-key", await fake.start(), timeout_s=5, retry=RetryPolicy())
        kind = GeminiProvider if request.param == "gemini" else GeminiSseProvider
        made = kind(config)
    yield made
    await made.close()
    if fake is not None:
        await fake.close()


async def _collect(stream: AsyncIterator[StreamItem]) -> list[StreamItem]:
    return [item async for item in stream]


async def test_chunks_then_exactly_one_finish(provider: Provider) -> None:
    items = await _collect(provider.stream(_request("hello world")))
    assert isinstance(items[-1], Finish)
    assert all(isinstance(i, Chunk) for i in items[:-1]) and len(items) > 1
    finish = items[-1]
    assert finish.reason == "stop" and finish.error is None
    assert isinstance(finish.usage, Usage)
    assert finish.usage.input_tokens > 0 and finish.usage.output_tokens > 0
    assert "".join(i.text for i in items[:-1] if isinstance(i, Chunk)).strip()


async def test_output_limit_ends_with_length(provider: Provider) -> None:
    items = await _collect(provider.stream(_request("a b c d e f g h", max_output_tokens=3)))
    finish = items[-1]
    assert isinstance(finish, Finish) and finish.reason == "length"
    assert finish.usage.output_tokens <= 3


async def test_cancelling_the_consumer_stops_the_stream_at_once(provider: Provider) -> None:
    got_first = asyncio.Event()

    async def consume() -> None:
        async for item in provider.stream(_request(" ".join(["word"] * 500))):
            if isinstance(item, Chunk):
                got_first.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(got_first.wait(), 5)
    started = time.perf_counter()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.perf_counter() - started < 0.05
    assert provider.healthy()


def test_local_replies_are_deterministic_and_paced() -> None:
    async def run() -> tuple[str, str, float]:
        slow = LocalProvider(ttft_ms=100, token_ms=10)
        started = time.perf_counter()
        first = await _collect(slow.stream(_request("one two three")))
        elapsed = time.perf_counter() - started
        second = await _collect(slow.stream(_request("one two three")))
        text = "".join(i.text for i in first if isinstance(i, Chunk))
        return text, "".join(i.text for i in second if isinstance(i, Chunk)), elapsed

    first, second, elapsed = asyncio.run(run())
    assert first == second
    assert first.startswith("You said: one two three")
    words = len(first.split(" "))
    assert elapsed >= 0.1 + 0.01 * (words - 1) * 0.9  # TTFT plus a pace per word
