"""Retries as a real key meets them, on both transports against the fake: Google's
``RetryInfo`` waited when it fits the retry budget, else the reply ends at once with
``model_rate_limited``; the model guard holding a burst back; errors that count the
requests really made."""

from __future__ import annotations

import asyncio
import itertools
import re
import time

import pytest
from redis.asyncio import Redis

from chatserver.generation.gemini_answer import GeminiStreamError
from chatserver.generation.gemini_common import RetryPolicy
from chatserver.generation.gemini_retry import retry_info_delay
from chatserver.limits.model_guard import ModelLimits, ModelLimitTable
from chatserver.limits.model_guard_memory import MemoryModelGuard
from chatserver.limits.model_guard_redis import RedisModelGuard
from chatserver.ops.metrics import Metrics
from tests.fakegemini import FakeGemini, Status, Stream
from tests.serverproc import free_port

from .conftest import FAST_RETRY, MakeProvider, gemini_request, run_stream


def _requests_said(error: str | None) -> int:
    """The number of requests an error text says were made ("after 3 attempts")."""
    found = re.search(r"after (\d+) attempts?\b", error or "")
    return int(found.group(1)) if found else 1


async def test_a_retry_delay_that_fits_the_budget_is_waited(
    make: MakeProvider, fake: FakeGemini
) -> None:
    provider = make()
    await run_stream(provider, gemini_request("warm-up"))  # the SDK builds its client
    fake.script(Status(429, "per-minute quota", retry_delay="0.6s"), Stream(["fine"]))
    text, finish = await run_stream(provider, gemini_request("hi"))
    assert (text, finish.reason) == ("fine", "stop")
    first, second = fake.requests[1:]
    gap = second.received_at - first.received_at
    # What Google asked for, not the backoff's 0.05 s.
    assert 0.6 <= gap < 1.5, f"waited {gap:.2f} s"


async def test_a_retry_delay_past_the_budget_ends_the_reply_at_once(
    make: MakeProvider, fake: FakeGemini
) -> None:
    provider = make()
    await run_stream(provider, gemini_request("warm-up"))
    fake.script(Status(429, "Quota exceeded for quota metric", retry_delay="37s"))
    started = time.monotonic()
    text, finish = await run_stream(provider, gemini_request("hi"))
    assert time.monotonic() - started < 1.0
    assert len(fake.requests) == 2, "no request spent on a quota that is out"
    assert text == "" and finish.reason == "error" and not finish.retryable
    assert (finish.error_code, finish.retry_after_ms) == ("model_rate_limited", 37_000)
    error = finish.error or ""
    assert "model rate limited after 1 attempt:" in error and "Quota exceeded" in error
    assert "37 s" in error and "retry budget (10 s)" in error


async def test_the_budget_counts_every_wait_of_the_reply(
    make: MakeProvider, fake: FakeGemini
) -> None:
    # 0.4 s, then 0.4 s more would pass a 0.6 s budget: two requests, then the end.
    provider = make(retry=RetryPolicy(attempts=5, initial_s=0.05, budget_s=0.6))
    fake.default = Status(503, "overloaded", retry_delay="0.4s")
    _, finish = await run_stream(provider, gemini_request("hi"))
    assert len(fake.requests) == 2 == _requests_said(finish.error)
    assert finish.error_code == "model_unavailable" and finish.retry_after_ms == 400


@pytest.mark.parametrize(
    ("scripted", "policy", "code", "head"),
    [
        # A 200 whose first event is an error: one request made, one told.
        (
            Stream(["x"], error_after=0, error_code=503),
            RetryPolicy(attempts=1),
            "model_unavailable",
            "model unavailable after 1 attempt:",
        ),
        (
            Stream(["x"], error_after=0, error_code=503),
            FAST_RETRY,
            "model_unavailable",
            "model unavailable after 3 attempts:",
        ),
        (Status(503), FAST_RETRY, "model_unavailable", "model unavailable after 3 attempts:"),
        (Status(429), FAST_RETRY, "model_rate_limited", "model rate limited after 3 attempts:"),
        (Status(400), FAST_RETRY, "model_rejected", "model request failed: 400"),
        (Status(404), FAST_RETRY, "model_rejected", "model request failed: 404"),
    ],
    ids=["event-once", "event", "503", "429", "400", "404"],
)
async def test_the_error_says_how_many_requests_were_made(
    make: MakeProvider,
    fake: FakeGemini,
    scripted: Stream | Status,
    policy: RetryPolicy,
    code: str,
    head: str,
) -> None:
    fake.default = scripted
    _, finish = await run_stream(make(retry=policy), gemini_request("hi"))
    assert finish.reason == "error" and (finish.error or "").startswith(head), finish.error
    assert finish.error_code == code and finish.retry_after_ms is None
    assert len(fake.requests) == _requests_said(finish.error)


async def test_the_guard_holds_a_burst_back_instead_of_sending_it(
    make: MakeProvider, fake: FakeGemini
) -> None:
    guard = MemoryModelGuard(ModelLimitTable(ModelLimits(concurrent=1)))
    provider = make(guard=guard)
    await run_stream(provider, gemini_request("warm-up"))
    fake.default = Stream(["one ", "two ", "three"], pace_s=0.05)
    results = await asyncio.gather(*(run_stream(provider, gemini_request("hi")) for _ in range(3)))
    assert [finish.reason for _, finish in results] == ["stop"] * 3
    burst = sorted(fake.requests[1:], key=lambda r: r.received_at)
    for earlier, later in itertools.pairwise(burst):
        assert earlier.ended_at is not None and later.received_at >= earlier.ended_at, (
            "two requests to the model at once past its cap"
        )
    metrics = provider._metrics
    assert isinstance(metrics, Metrics)
    waited = metrics.model_throttled.labels("gemini-2.5-flash", "concurrent", "waited")
    assert waited._value.get() == 2


async def test_past_the_budget_the_guard_refuses_with_model_rate_limited(
    make: MakeProvider, fake: FakeGemini
) -> None:
    guard = MemoryModelGuard(ModelLimitTable(ModelLimits(per_minute=1)))
    provider = make(guard=guard)
    _, first = await run_stream(provider, gemini_request("hi"))
    started = time.monotonic()
    _, finish = await run_stream(provider, gemini_request("again"))
    assert first.reason == "stop" and time.monotonic() - started < 0.5
    assert len(fake.requests) == 1, "the refused reply sent nothing"
    assert finish.reason == "error" and finish.error_code == "model_rate_limited"
    assert finish.retry_after_ms is not None and 55_000 < finish.retry_after_ms <= 60_001
    assert "1 requests to gemini-2.5-flash a minute" in (finish.error or "")


async def test_every_retry_is_admitted_by_the_guard(make: MakeProvider, fake: FakeGemini) -> None:
    # Each request counts against Google's quota, retries too: the third would pass 2/min.
    guard = MemoryModelGuard(ModelLimitTable(ModelLimits(per_minute=2)))
    fake.script(Status(503), Status(503), Stream(["never asked"]))
    _, finish = await run_stream(make(guard=guard), gemini_request("hi"))
    assert len(fake.requests) == 2 == _requests_said(finish.error)
    assert finish.error_code == "model_rate_limited" and "a minute" in (finish.error or "")


async def test_a_guard_that_cannot_be_reached_lets_the_request_go(
    make: MakeProvider, fake: FakeGemini
) -> None:
    # The guard spares the quota; a Redis outage must not fail the replies it guards.
    unreachable = Redis.from_url(f"redis://127.0.0.1:{free_port()}/0")
    guard = RedisModelGuard(unreachable, ModelLimitTable(ModelLimits(concurrent=1)))
    try:
        text, finish = await run_stream(make(guard=guard), gemini_request("hi"))
    finally:
        await guard.close()
        await unreachable.aclose()
    assert finish.reason == "stop" and text and len(fake.requests) == 1


def test_retry_info_is_read_from_either_form_of_the_error() -> None:
    body = {
        "error": {
            "code": 429,
            "details": [
                {"@type": "type.googleapis.com/google.rpc.Help"},
                {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "1.5s"},
            ],
        }
    }
    assert retry_info_delay(GeminiStreamError.from_body(429, body)) == 1.5
    assert retry_info_delay(GeminiStreamError.from_body(429, [body])) == 1.5  # a list of one
    proto = {"error": {"details": [{**body["error"]["details"][1], "retryDelay": {"seconds": 2}}]}}
    assert retry_info_delay(GeminiStreamError.from_body(429, proto)) == 2.0
    assert retry_info_delay(GeminiStreamError.from_body(429, {"error": {"code": 429}})) is None
    assert retry_info_delay(ValueError("no body")) is None
