"""The Gemini providers against the fake Gemini server, over real HTTP.

Every test runs on both transports: ``sdk`` (google-genai's generate_content_stream) and
``sse`` (the lean aiohttp path): the same requests, the same failures, the same finishes.
"""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest

from chatserver.generation.gemini_common import CachedProbe, RetryPolicy, request_body
from chatserver.generation.provider import Chunk, Finish, ReplyRequest
from protocol import Usage
from tests.fakegemini import FakeGemini, Status, Stream
from tests.serverproc import free_port

from .conftest import FAST_RETRY, MakeProvider
from .conftest import gemini_request as _request
from .conftest import message as _message
from .conftest import run_stream as _run


async def test_the_request_carries_the_agent_and_the_window(
    make: MakeProvider, fake: FakeGemini
) -> None:
    provider = make()
    request = _request("first question", "an answer", "follow-up", model="gemini-2.5-pro")
    await _run(provider, request)
    sent = fake.requests[0]
    assert sent.path == "/v1beta/models/gemini-2.5-pro:streamGenerateContent"
    assert sent.query == "alt=sse"
    assert sent.headers["x-goog-api-key"] == "test-key"
    assert sent.body == {
        "contents": [
            {"role": "user", "parts": [{"text": "first question"}]},
            {"role": "model", "parts": [{"text": "an answer"}]},
            {"role": "user", "parts": [{"text": "follow-up"}]},
        ],
        "systemInstruction": {"parts": [{"text": "Be brief."}], "role": "user"},
        "generationConfig": {"temperature": 0.25, "maxOutputTokens": 100},
    }
    assert sent.body == request_body(request)  # the lean path sends what the SDK sends


def test_consecutive_turns_of_one_role_merge_and_empty_ones_are_dropped() -> None:
    history = (
        _message(1, "user", "alice asks"),
        _message(2, "user", "bob adds"),
        _message(3, "assistant", ""),  # a reply cancelled before its first word
        _message(4, "user", "carol too"),
    )
    body = request_body(ReplyRequest("general", "m", "", history, 0.7, 10))
    assert body["contents"] == [
        {
            "role": "user",
            "parts": [{"text": "alice asks"}, {"text": "bob adds"}, {"text": "carol too"}],
        }
    ]
    assert "systemInstruction" not in body


async def test_chunks_stream_and_usage_comes_from_usage_metadata(
    make: MakeProvider, fake: FakeGemini
) -> None:
    fake.script(Stream(["Hel", "lo ", "there"], usage=(17, 9), thoughts_tokens=5))
    text, finish = await _run(make(), _request("hi"))
    assert text == "Hello there"
    # thinking tokens are billed as output, so they count; and they are told apart
    assert finish == Finish("stop", Usage(17, 9 + 5), thinking_tokens=5)


async def test_429_then_success_is_retried_with_backoff(
    make: MakeProvider, fake: FakeGemini
) -> None:
    fake.script(Status(429), Status(503), Stream(["fine"]))
    text, finish = await _run(make(), _request("hi"))
    assert (text, finish.reason) == ("fine", "stop")
    assert len(fake.requests) == 3
    gaps = [b.received_at - a.received_at for a, b in itertools.pairwise(fake.requests)]
    assert gaps[0] >= 0.05 and gaps[1] >= 0.1, f"exponential backoff expected: {gaps}"
    # Ours, not a hidden retry of the SDK's (1-10 s a step). Between the requests, not from
    # the start: the SDK's first call builds its client (seconds on a busy machine).
    assert max(gaps) < 1.0, gaps


async def test_5xx_until_the_limit_ends_with_error(make: MakeProvider, fake: FakeGemini) -> None:
    fake.default = Status(500, "backend exploded")
    text, finish = await _run(make(), _request("hi"))
    assert len(fake.requests) == FAST_RETRY.attempts
    assert text == "" and finish.reason == "error" and finish.usage == Usage(0, 0)
    assert finish.error is not None
    assert "after 3 attempts" in finish.error and "500" in finish.error
    assert "backend exploded" in finish.error


@pytest.mark.parametrize("status", [400, 403, 404])
async def test_4xx_is_not_retried(make: MakeProvider, fake: FakeGemini, status: int) -> None:
    fake.default = Status(status, "bad request body")
    _, finish = await _run(make(), _request("hi"))
    assert len(fake.requests) == 1
    assert finish.reason == "error" and finish.error is not None
    assert str(status) in finish.error and "bad request body" in finish.error


async def test_no_hidden_retry_on_connection_errors(make: MakeProvider) -> None:
    # Nothing listens there: with 0 retries the failure is immediate (the SDK's hidden
    # default would sleep 1-10 s and try again).
    provider = make(base_url=f"http://127.0.0.1:{free_port()}", retry=RetryPolicy(attempts=1))
    await _run(provider, _request("warm-up"))  # the SDK builds its client: seconds when busy
    started = time.monotonic()
    _, finish = await _run(provider, _request("hi"))
    assert finish.reason == "error" and "cannot reach the model" in (finish.error or "")
    assert time.monotonic() - started < 0.9  # a hidden retry sleeps 1 s at least


async def test_an_error_event_mid_stream_keeps_the_partial_text(
    make: MakeProvider, fake: FakeGemini
) -> None:
    fake.script(Stream(["one ", "two ", "three"], error_after=2, error_code=503))
    text, finish = await _run(make(), _request("hi"))
    assert text == "one two "
    assert finish.reason == "error" and finish.error is not None
    assert "after 2 chunks" in finish.error and "mid-stream failure" in finish.error
    assert len(fake.requests) == 1, "a failure after the first chunk is never retried"


async def test_a_cut_connection_is_an_error_not_a_success(
    make: MakeProvider, fake: FakeGemini
) -> None:
    fake.script(Stream(["one ", "two ", "three"], drop_after=2, pace_s=0.01))
    text, finish = await _run(make(), _request("hi"))
    assert text == "one two "
    assert finish.reason == "error" and "connection to the model was cut" in (finish.error or "")
    assert finish.usage.output_tokens == 2  # estimated from what arrived: nothing unbilled


async def test_a_stream_without_finish_reason_is_an_error(
    make: MakeProvider, fake: FakeGemini
) -> None:
    fake.script(Stream(["all ", "of it"], finish=None))
    text, finish = await _run(make(), _request("hi"))
    assert text == "all of it"
    assert finish.reason == "error" and "without a finish reason" in (finish.error or "")


@pytest.mark.parametrize(
    ("scripted", "reason"),
    [
        (Stream(["partial"], finish="SAFETY"), "safety"),
        (Stream(["quoted"], finish="RECITATION"), "safety"),
        (Stream([], block_reason="SAFETY"), "safety"),
        (Stream(["a ", "b"], finish="MAX_TOKENS"), "length"),
        (Stream(["odd"], finish="OTHER"), "error"),
    ],
    ids=["safety", "recitation", "prompt-blocked", "max-tokens", "other"],
)
async def test_finish_reasons_map_to_the_contract(
    make: MakeProvider, fake: FakeGemini, scripted: Stream, reason: str
) -> None:
    fake.script(scripted)
    _, finish = await _run(make(), _request("hi"))
    assert finish.reason == reason


async def test_a_slow_first_byte_times_out(make: MakeProvider, fake: FakeGemini) -> None:
    fake.script(Stream(["warm"]), Stream(["late"], first_byte_delay_s=5))
    provider = make(timeout_s=0.3)
    await _run(provider, _request("warm-up"))  # the SDK builds its client: seconds when busy
    started = time.monotonic()
    _, finish = await _run(provider, _request("hi", thinking_budget=0))  # no thinking wait
    elapsed = time.monotonic() - started
    assert finish.reason == "error" and "no data from the model for 0.3 s" in (finish.error or "")
    assert 0.25 < elapsed < 1.5
    gone = await fake.wait_disconnect(1)  # the timed request, after the warm-up
    assert gone - started < 1.5  # and the upstream request was abandoned


async def test_a_stall_mid_stream_times_out_and_keeps_the_text(
    make: MakeProvider, fake: FakeGemini
) -> None:
    fake.script(Stream(["quick ", "then nothing"], pace_s=5))
    text, finish = await _run(make(timeout_s=0.3), _request("hi"))
    assert text == "quick "
    assert finish.reason == "error" and "after 1 chunks" in (finish.error or "")


async def test_cancelling_the_task_closes_the_upstream_connection(
    make: MakeProvider, fake: FakeGemini
) -> None:
    fake.script(Stream([f"w{i} " for i in range(500)], pace_s=0.01))
    provider = make()
    first = asyncio.Event()

    async def consume() -> None:
        async for item in provider.stream(_request("hi")):
            if isinstance(item, Chunk):
                first.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first.wait(), 5)
    cancelled_at = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    gone = await fake.wait_disconnect(0)
    assert gone - cancelled_at < 0.1, f"the fake saw the disconnect after {gone - cancelled_at}s"
    assert fake.requests[0].chunks_sent < 500
    assert provider.active == 0


async def test_failures_are_counted_by_kind(make: MakeProvider, fake: FakeGemini) -> None:
    provider = make()
    fake.script(Status(400), Stream(["x"], finish=None))
    await _run(provider, _request("hi"))
    await _run(provider, _request("hi"))
    metrics = provider._metrics
    assert metrics is not None
    errors = metrics.model_errors
    assert errors.labels(provider.name, "client")._value.get() == 1
    assert errors.labels(provider.name, "no_finish")._value.get() == 1


async def test_the_health_probe_is_cheap_and_cached(make: MakeProvider, fake: FakeGemini) -> None:
    provider = make(probe_model="gemini-2.5-flash-lite")
    await asyncio.gather(*(provider.probe() for _ in range(5)))
    await provider.probe()
    assert fake.probes == 1, "one upstream call for many health checks"
    assert provider.healthy()


async def test_a_failed_probe_reports_down(make: MakeProvider, fake: FakeGemini) -> None:
    fake.probe_status = 403
    provider = make()
    with pytest.raises(ConnectionError, match="403"):
        await provider.probe()
    assert not provider.healthy()


async def test_cached_probe_expires_after_its_ttl() -> None:
    now = [0.0]
    calls: list[float] = []

    async def call() -> None:
        calls.append(now[0])
        if len(calls) == 2:
            raise OSError("upstream down")

    probe = CachedProbe(call, ttl_s=30, clock=lambda: now[0])
    await probe()
    now[0] = 29.9
    await probe()
    assert calls == [0.0]
    now[0] = 30.0
    with pytest.raises(ConnectionError, match="upstream down"):
        await probe()
    now[0] = 34.0  # a failure is remembered for 5 s only
    with pytest.raises(ConnectionError):
        await probe()
    now[0] = 35.0
    await probe()
    assert calls == [0.0, 30.0, 35.0] and probe.healthy
