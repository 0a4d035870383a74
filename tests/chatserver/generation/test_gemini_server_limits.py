"""The whole server on the fake Gemini, as a real key meets it: a thinking model announced in
``gen_start``, its thinking tokens told apart, a rate limit ended at once with a code and a
time, the model guard shared by the instances through Redis, and errors that say how often
the reply was tried."""

from __future__ import annotations

import time

import pytest
from redis.asyncio import Redis

from chatserver import keys
from chatserver.backends import make_model_guard
from chatserver.limits.model_guard_memory import MemoryModelGuard
from chatserver.limits.model_guard_redis import RedisModelGuard
from chatserver.settings import Settings
from tests.fakegemini import FakeGemini, Status, Stream

from ..conftest import MakeHarness, outbox_drained
from .test_gemini_server import _ask, _gemini, _metric


@pytest.fixture(params=["sse", "sdk"])
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


LONG = "please explain " + " ".join(f"w{i}" for i in range(60))  # never the light model


async def test_a_thinking_agent_is_announced_and_its_thinking_told_apart(
    make_harness: MakeHarness, fake: FakeGemini, transport: str
) -> None:
    harness = await _gemini(make_harness, fake, response_cache_ttl_s=0, gemini_transport=transport)
    fake.script(Stream(["Save ", "first."], usage=(40, 2), thoughts_tokens=300))
    _, _, reply = await _ask(harness, "alice", LONG, agent="finance-helper")
    assert reply.start is not None and reply.start.thinking, "2.5 Pro thinks: say so"
    assert reply.start.model == "gemini-2.5-pro"
    assert reply.end is not None and reply.end.finish_reason == "stop"
    assert reply.end.usage.output_tokens == 2 + 300 and reply.end.thinking_tokens == 300
    sent = fake.requests[0].body["generationConfig"]
    assert sent["maxOutputTokens"] == 3072  # the agent's budget of 1024 leaves room
    pro = {"model": "gemini-2.5-pro"}
    assert _metric(harness, "chat_tokens_total", **pro, direction="output") == 2
    assert _metric(harness, "chat_tokens_total", **pro, direction="thinking") == 300
    # The quota counts every token paid for, thinking included.
    await outbox_drained(harness.app)
    assert reply.end.message is not None
    day = reply.end.message.created_at[:10]
    assert await harness.app[keys.STORE].usage_on("alice", day) == 40 + 302

    _, _, plain = await _ask(harness, "bob", LONG)  # general: thinking_budget = 0
    assert plain.start is not None and not plain.start.thinking
    assert plain.end is not None and plain.end.thinking_tokens is None


async def test_a_quota_that_asks_for_a_long_wait_ends_the_reply_at_once(
    make_harness: MakeHarness, fake: FakeGemini, transport: str
) -> None:
    harness = await _gemini(make_harness, fake, gemini_transport=transport)
    fake.script(Status(429, "Quota exceeded", retry_delay="37s"))
    started = time.monotonic()
    _, _, reply = await _ask(harness, "alice", LONG)
    assert time.monotonic() - started < 3.0
    assert reply.end is not None and reply.end.finish_reason == "error"
    assert reply.end.error_code == "model_rate_limited" and reply.end.retry_after_ms == 37_000
    assert "Quota exceeded" in (reply.end.error or "")
    assert reply.end.message is not None and reply.end.message.finish_reason == "error"
    assert len(fake.requests) == 1
    assert _metric(harness, "chat_reply_jobs_retried_total") == 0


async def test_a_first_chunk_that_never_comes_is_tried_again_and_the_error_says_so(
    make_harness: MakeHarness, fake: FakeGemini, transport: str
) -> None:
    harness = await _gemini(
        make_harness, fake, gemini_timeout_s=0.3, reply_attempts=2, gemini_transport=transport
    )
    fake.default = Stream(["late"], first_byte_delay_s=5)
    _, _, reply = await _ask(harness, "alice", LONG)
    assert reply.end is not None and reply.end.finish_reason == "error"
    error = reply.end.error or ""
    assert "no data from the model for 0.3 s" in error and "(reply tried 2 times)" in error
    assert len(fake.requests) == 2
    assert reply.end.error_code == "model_unavailable"


async def test_the_model_guard_is_shared_by_the_instances_through_redis(
    make_harness: MakeHarness, fake: FakeGemini, redis_url: str
) -> None:
    shared = {
        "redis_url": redis_url,
        "redis_key_prefix": f"guard{time.monotonic_ns()}",
        "gemini_model_limits": "gemini-2.5-flash=0/1",  # one request a minute
        "response_cache_ttl_s": 0,
    }
    one = await _gemini(make_harness, fake, **shared)
    two = await _gemini(make_harness, fake, **shared)
    assert isinstance(one.app[keys.GENERATION].provider._guard, RedisModelGuard)  # type: ignore[attr-defined]
    _, _, first = await _ask(one, "alice", LONG)
    _, _, second = await _ask(two, "bob", LONG)
    assert first.end is not None and first.end.finish_reason == "stop"
    assert second.end is not None and second.end.finish_reason == "error"
    assert second.end.error_code == "model_rate_limited"
    assert second.end.retry_after_ms is not None and second.end.retry_after_ms > 50_000
    assert len(fake.requests) == 1, "the second instance sent nothing"
    redis = Redis.from_url(redis_url)
    try:
        started = f"{shared['redis_key_prefix']}:{{m:gemini-2.5-flash}}:started"
        assert await redis.zcard(started) == 1
    finally:
        await redis.aclose()
    assert (
        _metric(
            two,
            "chat_model_throttled_total",
            model="gemini-2.5-flash",
            limit="per_minute",
            outcome="refused",
        )
        == 1
    )


def test_the_guard_is_in_memory_alone_in_redis_with_it_and_absent_without_a_key() -> None:
    keyed = Settings.of(gemini_api_key="k")
    assert isinstance(make_model_guard(keyed, None), MemoryModelGuard)
    assert make_model_guard(Settings.of(), None) is None
