"""The response cache: one conformance suite for the memory and the Redis implementation,
plus the routing rule."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from chatserver.agents import Agent
from chatserver.backends import make_response_cache
from chatserver.generation.cache import (
    MemoryResponseCache,
    RedisResponseCache,
    ResponseCache,
    cache_key,
    normalise_prompt,
)
from chatserver.generation.routing import Router
from chatserver.settings import Settings
from protocol import Message

AGENT = Agent("general", "General", "d", "gemini-2.5-flash", "Be kind.", "gemini-2.5-flash-lite")


@pytest.fixture(params=["memory", "redis"])
async def cache(request: pytest.FixtureRequest) -> AsyncIterator[ResponseCache]:
    if request.param == "memory":
        yield MemoryResponseCache(ttl_s=0.2)
        return
    redis = Redis.from_url(request.getfixturevalue("redis_url"))
    yield RedisResponseCache(redis, prefix="chattest", ttl_s=0.2)
    await redis.aclose()


def test_normalising_casefolds_collapses_whitespace_and_strips() -> None:
    assert normalise_prompt("  What IS\ta  Budget?\n") == "what is a budget?"
    assert normalise_prompt("STRASSE") == normalise_prompt("straße")


async def test_a_stored_answer_is_found_under_the_normalised_question(
    cache: ResponseCache,
) -> None:
    await cache.put(cache_key(AGENT, "gemini-2.5-flash", "What is a budget?"), "A plan. ✓")
    assert await cache.get(cache_key(AGENT, "gemini-2.5-flash", " what  is a BUDGET? ")) == (
        "A plan. ✓"
    )


async def test_agent_model_and_agent_setup_are_part_of_the_key(cache: ResponseCache) -> None:
    await cache.put(cache_key(AGENT, "gemini-2.5-flash", "q"), "answer")
    other = Agent("coach", "Coach", "d", "gemini-2.5-flash", "Be kind.")
    edited = Agent("general", "General", "d", "gemini-2.5-flash", "Be terse.")
    assert await cache.get(cache_key(AGENT, "gemini-2.5-flash-lite", "q")) is None
    assert await cache.get(cache_key(other, "gemini-2.5-flash", "q")) is None
    assert await cache.get(cache_key(edited, "gemini-2.5-flash", "q")) is None


async def test_answers_expire_after_the_ttl(cache: ResponseCache) -> None:
    key = cache_key(AGENT, "gemini-2.5-flash", "q")
    await cache.put(key, "answer")
    assert await cache.get(key) == "answer"
    await asyncio.sleep(0.25)
    assert await cache.get(key) is None


async def test_empty_or_huge_answers_are_not_stored(cache: ResponseCache) -> None:
    await cache.put(cache_key(AGENT, "m", "empty"), "")
    await cache.put(cache_key(AGENT, "m", "huge"), "x" * 100_000)
    assert await cache.get(cache_key(AGENT, "m", "empty")) is None
    assert await cache.get(cache_key(AGENT, "m", "huge")) is None


async def test_the_memory_cache_is_a_bounded_lru() -> None:
    cache = MemoryResponseCache(ttl_s=60, max_entries=2)
    a, b, c = (cache_key(AGENT, "m", q) for q in "abc")
    await cache.put(a, "A")
    await cache.put(b, "B")
    assert await cache.get(a) == "A"  # a is now the most recently used
    await cache.put(c, "C")
    assert len(cache) == 2
    assert (await cache.get(a), await cache.get(b), await cache.get(c)) == ("A", None, "C")


async def test_the_memory_cache_is_bounded_in_bytes_too() -> None:
    text = "y" * 1000
    each = sys.getsizeof(text)
    cache = MemoryResponseCache(ttl_s=60, max_entries=100, max_bytes=3 * each)
    keys = [cache_key(AGENT, "m", f"q{i}") for i in range(5)]
    for key in keys:
        await cache.put(key, text)
        await cache.put(key, text)  # again: counted once
    assert cache.fill() == {
        "response_cache_entries": (3, 100),
        "response_cache_bytes": (3 * each, 3 * each),
    }
    assert [await cache.get(k) for k in keys] == [None, None, text, text, text]


async def test_the_redis_cache_keeps_one_expiring_key_under_the_prefix(redis_url: str) -> None:
    redis = Redis.from_url(redis_url)
    try:
        cache = RedisResponseCache(redis, prefix="chat", ttl_s=300)
        key = cache_key(AGENT, "m", "q")
        await cache.put(key, "answer")
        assert await redis.keys("*") == [f"chat:rcache:{key.digest()}".encode()]
        assert 290 < await redis.ttl(f"chat:rcache:{key.digest()}") <= 300
    finally:
        await redis.aclose()


def test_the_settings_choose_the_cache() -> None:
    assert make_response_cache(Settings(), None) is None  # the local model costs nothing
    keyed = Settings.of(gemini_api_key="k")
    assert isinstance(make_response_cache(keyed, None), MemoryResponseCache)
    assert (
        make_response_cache(Settings.of(gemini_api_key="k", response_cache_ttl_s=0), None) is None
    )
    redis = Redis()  # never connected: only chosen
    assert isinstance(make_response_cache(keyed, redis), RedisResponseCache)


def _message(offset: int, text: str) -> Message:
    return Message("m", "c", offset, "user", text, "2026-01-01T00:00:00.000Z", user_id="u")


def test_routing_sends_short_first_turns_to_the_light_model() -> None:
    router = Router(light_max_chars=20)
    assert router.choose(AGENT, _message(1, "  hi there  ")).model == "gemini-2.5-flash-lite"
    assert router.choose(AGENT, _message(1, "x" * 21)).model == "gemini-2.5-flash"
    assert router.choose(AGENT, _message(3, "hi")).model == "gemini-2.5-flash"
    no_light = Agent("x", "X", "d", "gemini-2.5-pro", "p")
    assert router.choose(no_light, _message(1, "hi")).model == "gemini-2.5-pro"
    assert Router(light_max_chars=0).choose(AGENT, _message(1, "hi")).route == "default"
