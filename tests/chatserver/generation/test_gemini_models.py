"""Gemini as a real key meets it, on both transports against the fake: model names in both
forms, the health probe's too; thinking budgets, thinking tokens and the wait for a first
chunk while the model thinks."""

from __future__ import annotations

import time

import aiohttp
import pytest

from chatserver.generation.gemini_common import request_body
from protocol import Usage
from tests.fakegemini import FakeGemini, Stream

from .conftest import MakeProvider, camel_keys, gemini_request, run_stream


@pytest.mark.parametrize(
    ("model", "path"),
    [
        ("gemini-2.5-pro", "/v1beta/models/gemini-2.5-pro"),
        ("models/gemini-2.5-pro", "/v1beta/models/gemini-2.5-pro"),
        ("tunedModels/support-bot-7", "/v1beta/tunedModels/support-bot-7"),
    ],
    ids=["id", "models/", "tunedModels/"],
)
async def test_both_forms_of_a_model_name_reach_the_model(
    make: MakeProvider, fake: FakeGemini, model: str, path: str
) -> None:
    fake.script(Stream(["fine"]))
    text, finish = await run_stream(make(), gemini_request("hi", model=model))
    assert (text, finish.reason, finish.error) == ("fine", "stop", None)
    assert fake.requests[0].path == f"{path}:streamGenerateContent"


async def test_the_fake_refuses_a_doubled_prefix_as_google_does(fake: FakeGemini) -> None:
    # What the SSE path used to send for "models/…": the test above could fail.
    async with aiohttp.ClientSession() as http:
        url = f"{fake.base_url}/v1beta/models/models/gemini-2.5-pro:streamGenerateContent"
        async with http.post(url, json={}) as response:
            assert response.status == 404
    assert fake.requests == []


@pytest.mark.parametrize(
    ("probe_model", "looked_up"),
    [
        ("gemini-2.5-flash-lite", "models/gemini-2.5-flash-lite"),
        ("models/gemini-2.5-flash-lite", "models/gemini-2.5-flash-lite"),
        ("tunedModels/support-bot-7", "tunedModels/support-bot-7"),
    ],
    ids=["id", "models/", "tunedModels/"],
)
async def test_the_health_probe_takes_both_forms(
    make: MakeProvider, fake: FakeGemini, probe_model: str, looked_up: str
) -> None:
    provider = make(probe_model=probe_model)
    await provider.probe()
    assert fake.probed == [looked_up] and provider.healthy()


@pytest.mark.parametrize("budget", [0, -1, 512])
async def test_a_thinking_budget_is_sent_and_thoughts_are_never_asked_for(
    make: MakeProvider, fake: FakeGemini, budget: int
) -> None:
    request = gemini_request("hi", max_tokens=1024, thinking_budget=budget)
    await run_stream(make(), request)
    sent = camel_keys(fake.requests[0].body)
    assert isinstance(sent, dict)
    assert sent["generationConfig"]["thinkingConfig"] == {
        "includeThoughts": False,
        "thinkingBudget": budget,
    }
    assert sent == request_body(request)


async def test_without_a_budget_no_thinking_config_is_sent(
    make: MakeProvider, fake: FakeGemini
) -> None:
    # A model that cannot think refuses the field: absent means not sent.
    await run_stream(make(), gemini_request("hi"))
    assert "thinkingConfig" not in fake.requests[0].body["generationConfig"]


async def test_thinking_tokens_are_billed_as_output_and_reported_apart(
    make: MakeProvider, fake: FakeGemini
) -> None:
    fake.script(Stream(["All ", "good."], usage=(10, 3), thoughts_tokens=40))
    text, finish = await run_stream(make(), gemini_request("hi", thinking_budget=-1))
    assert text == "All good."
    assert finish.usage == Usage(10, 3 + 40) and finish.thinking_tokens == 40


async def test_thinking_can_use_up_the_reply_unless_the_budget_leaves_room(
    make: MakeProvider, fake: FakeGemini
) -> None:
    answer = [f"w{i} " for i in range(30)]
    # Gemini 2.5 thinks by default; its thoughts count against maxOutputTokens first.
    fake.default = Stream(answer, thoughts_tokens=2000)
    provider = make()
    text, finish = await run_stream(provider, gemini_request("hi", max_tokens=1024))
    assert (text, finish.reason) == ("", "length"), "the issue: thinking ate the reply"
    assert finish.thinking_tokens == 1024
    text, finish = await run_stream(
        provider, gemini_request("hi", max_tokens=1024, thinking_budget=0)
    )
    assert (text, finish.reason) == ("".join(answer), "stop")
    assert finish.thinking_tokens == 0
    text, finish = await run_stream(
        provider, gemini_request("hi", max_tokens=1024, thinking_budget=500)
    )
    assert (text, finish.reason, finish.thinking_tokens) == ("".join(answer), "stop", 500)


async def test_the_first_chunk_of_a_thinking_reply_is_waited_for_longer(
    make: MakeProvider, fake: FakeGemini
) -> None:
    provider = make(timeout_s=0.3, thinking_timeout_s=5.0)
    await run_stream(provider, gemini_request("warm-up"))  # the SDK builds its client
    fake.script(Stream(["thought ", "it through"], think_s=0.8))
    text, finish = await run_stream(provider, gemini_request("hi", thinking_budget=-1))
    assert (text, finish.reason) == ("thought it through", "stop")
    # The same silence without thinking is a stall.
    fake.script(Stream(["thought ", "it through"], think_s=0.8))
    _, finish = await run_stream(provider, gemini_request("hi", thinking_budget=0))
    assert finish.reason == "error" and "no data from the model for 0.3 s" in (finish.error or "")
    assert finish.retryable, "a stall before any text may be tried again"


async def test_after_the_first_chunk_the_short_wait_applies_again(
    make: MakeProvider, fake: FakeGemini
) -> None:
    provider = make(timeout_s=0.3, thinking_timeout_s=5.0)
    await run_stream(provider, gemini_request("warm-up"))
    fake.script(Stream(["first ", "never"], think_s=0.5, pace_s=5.0))
    started = time.monotonic()
    text, finish = await run_stream(provider, gemini_request("hi", thinking_budget=-1))
    elapsed = time.monotonic() - started
    assert text == "first " and finish.reason == "error"
    assert "after 1 chunks" in (finish.error or "") and "for 0.3 s" in (finish.error or "")
    assert elapsed < 2.5, f"the stall after the first chunk was waited {elapsed:.2f} s"


async def test_a_thinking_reply_that_never_writes_ends_saying_so(
    make: MakeProvider, fake: FakeGemini
) -> None:
    provider = make(timeout_s=0.2, thinking_timeout_s=0.6)
    await run_stream(provider, gemini_request("warm-up"))
    fake.script(Stream(["late"], think_s=5.0))
    started = time.monotonic()
    _, finish = await run_stream(provider, gemini_request("hi", thinking_budget=-1))
    assert 0.5 < time.monotonic() - started < 2.0
    assert finish.reason == "error" and finish.error_code == "model_unavailable"
    assert "no data from the model for 0.6 s" in (finish.error or "")
    assert "THINKING_TIMEOUT" in (finish.error or "")
    assert not finish.retryable, "a long thinking wait is not spent again"


def test_which_models_may_think() -> None:
    from chatserver.generation.gemini_common import may_think

    assert may_think("gemini-2.5-flash", None) and may_think("models/gemini-2.5-pro", None)
    assert not may_think("gemini-2.5-flash-lite", None)
    assert not may_think("gemini-2.0-flash", None) and not may_think("gemini-1.5-pro", None)
    assert may_think("gemini-2.5-flash-lite", 512) and may_think("gemini-2.0-flash", -1)
    assert not may_think("gemini-2.5-flash", 0)
