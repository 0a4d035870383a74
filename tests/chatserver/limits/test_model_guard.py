"""The model guard: one conformance suite for both (in memory; in Redis), and its sharing."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from chatserver.limits.model_guard import (
    Busy,
    ModelGuard,
    ModelLimits,
    ModelLimitTable,
    Permit,
)
from chatserver.limits.model_guard_memory import MemoryModelGuard
from chatserver.limits.model_guard_redis import RedisModelGuard

from ..conftest import eventually

TABLE = ModelLimitTable(
    ModelLimits(concurrent=2, per_minute=0),
    {"gemini-2.5-pro": ModelLimits(concurrent=0, per_minute=3), "free": ModelLimits(0, 0)},
)


@pytest.fixture(params=["memory", "redis"])
async def guard(request: pytest.FixtureRequest) -> AsyncIterator[ModelGuard]:
    if request.param == "memory":
        made: ModelGuard = MemoryModelGuard(TABLE)
        yield made
        await made.close()
        return
    redis = Redis.from_url(request.getfixturevalue("redis_url"))
    made = RedisModelGuard(redis, TABLE, prefix=f"g{time.monotonic_ns()}")
    yield made
    await made.close()
    await redis.aclose()


async def _granted(guard: ModelGuard, model: str) -> Permit:
    verdict = await guard.acquire(model)
    assert isinstance(verdict, Permit), verdict
    return verdict


async def test_requests_in_flight_are_capped_per_model_until_one_is_released(
    guard: ModelGuard,
) -> None:
    first = await _granted(guard, "gemini-2.5-flash")
    await _granted(guard, "gemini-2.5-flash")
    refused = await guard.acquire("gemini-2.5-flash")
    assert isinstance(refused, Busy) and refused.limit == "concurrent" and refused.cap == 2
    assert refused.retry_after_ms > 0
    await _granted(guard, "gemini-2.5-flash-lite")  # another model, its own places
    guard.release(first)

    async def granted_again() -> bool:
        return isinstance(await guard.acquire("gemini-2.5-flash"), Permit)

    # The Redis guard frees the place off the caller's path: soon, not necessarily at once.
    await eventually(granted_again, timeout=5, what="(the released place)")


async def test_a_model_name_and_its_resource_name_share_the_places(guard: ModelGuard) -> None:
    await _granted(guard, "gemini-2.5-flash")
    await _granted(guard, "models/gemini-2.5-flash")
    assert isinstance(await guard.acquire("gemini-2.5-flash"), Busy)


async def test_requests_per_minute_are_capped_and_say_when_one_is_allowed(
    guard: ModelGuard,
) -> None:
    for _ in range(3):
        guard.release(await _granted(guard, "gemini-2.5-pro"))  # released: still counted
    refused = await guard.acquire("gemini-2.5-pro")
    assert isinstance(refused, Busy) and refused.limit == "per_minute" and refused.cap == 3
    assert 59_000 <= refused.retry_after_ms <= 60_001  # the first of the minute ages out then
    assert isinstance(await guard.acquire("gemini-2.5-pro"), Busy)  # a refusal takes none


async def test_a_model_without_caps_is_never_refused(guard: ModelGuard) -> None:
    permits = [await _granted(guard, "free") for _ in range(50)]
    for permit in permits:
        guard.release(permit)


def test_limits_are_written_model_equals_concurrent_slash_per_minute() -> None:
    table = ModelLimitTable.parse(
        " gemini-2.5-pro=20/150, models/gemini-2.5-flash=100/1000 ", ModelLimits(7, 0)
    )
    assert table.of("models/gemini-2.5-pro") == ModelLimits(20, 150)
    assert table.of("gemini-2.5-flash") == ModelLimits(100, 1000)
    assert table.of("tunedModels/mine") == ModelLimits(7, 0)
    for bad in ("gemini=20", "gemini=a/1", "=1/2", "gemini=-1/2"):
        with pytest.raises(ValueError):
            ModelLimitTable.parse(bad, ModelLimits())


async def test_places_and_starts_are_shared_by_every_instance_through_redis(
    redis_url: str,
) -> None:
    prefix = f"s{time.monotonic_ns()}"
    one, two = Redis.from_url(redis_url), Redis.from_url(redis_url)
    a, b = RedisModelGuard(one, TABLE, prefix=prefix), RedisModelGuard(two, TABLE, prefix=prefix)
    try:
        await _granted(a, "gemini-2.5-flash")
        await _granted(b, "gemini-2.5-flash")
        assert isinstance(await a.acquire("gemini-2.5-flash"), Busy)
        assert isinstance(await b.acquire("gemini-2.5-flash"), Busy)
        for guard in (a, b, a):
            await _granted(guard, "gemini-2.5-pro")
        assert isinstance(await b.acquire("gemini-2.5-pro"), Busy)
    finally:
        await a.close()
        await b.close()
        await one.aclose()
        await two.aclose()


async def test_a_dead_holders_places_expire_and_a_live_ones_are_renewed(redis_url: str) -> None:
    prefix = f"d{time.monotonic_ns()}"
    one, two = Redis.from_url(redis_url), Redis.from_url(redis_url)
    dead = RedisModelGuard(one, TABLE, prefix=prefix, lease_s=0.3)
    live = RedisModelGuard(two, TABLE, prefix=prefix, lease_s=0.3)
    try:
        await _granted(dead, "gemini-2.5-flash")
        await dead.close()  # stops renewing without releasing: as if its process died
        await _granted(live, "gemini-2.5-flash")
        refused = await live.acquire("gemini-2.5-flash")
        assert isinstance(refused, Busy)
        started = time.monotonic()

        async def granted() -> bool:
            return isinstance(await live.acquire("gemini-2.5-flash"), Permit)

        await eventually(granted, timeout=5, what="(the dead holder's place)")  # its lease ran out
        assert time.monotonic() - started < 2
        # The live holder's two places outlast several leases: renewed, never taken.
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            assert isinstance(await live.acquire("gemini-2.5-flash"), Busy)
            await asyncio.sleep(0.05)
    finally:
        await live.close()
        await one.aclose()
        await two.aclose()
