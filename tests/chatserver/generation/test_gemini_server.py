"""The whole server on Gemini (the fake): replies, usage, cancel, routing, cache, health.

A real app on a real socket (the harness) with ``gemini_api_key`` and ``gemini_base_url``
pointing at the fake Gemini server running in the test's event loop.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from chatclient.client import ChatClient, Reply
from chatserver import keys
from chatserver.backends import make_provider
from chatserver.generation.gemini import GeminiProvider
from chatserver.generation.gemini_sse import GeminiSseProvider
from chatserver.generation.local import LocalProvider
from chatserver.settings import Settings, load
from protocol import Delta, GenEnd, GenStart, Usage
from tests.fakegemini import FakeGemini, Status, Stream

from ..conftest import Harness, MakeHarness, outbox_drained
from .conftest import camel_keys


@pytest.fixture
async def fake() -> AsyncIterator[FakeGemini]:
    server = FakeGemini(Stream(None, pace_s=0.002))  # echoes the question word by word
    await server.start()
    yield server
    await server.close()


@pytest.fixture(params=["sse", "sdk"])
async def gemini(
    request: pytest.FixtureRequest, make_harness: MakeHarness, fake: FakeGemini
) -> Harness:
    return await _gemini(make_harness, fake, gemini_transport=request.param)


async def _gemini(make_harness: MakeHarness, fake: FakeGemini, **overrides: Any) -> Harness:
    options: dict[str, Any] = {
        "gemini_api_key": "test-key",
        "gemini_base_url": fake.base_url,
        "gemini_timeout_s": 2.0,
        "gemini_retry_initial_s": 0.02,
    }
    return await make_harness(**{**options, **overrides})


async def _ask(
    harness: Harness, user: str, text: str, agent: str = "general"
) -> tuple[ChatClient, str, Reply]:
    conv = await harness.conversation(user, agent_id=agent)
    client = await harness.connect(user)
    await client.join(conv)
    ack = await client.send(conv, text)
    return client, conv, await client.reply(ack.message_id)


def _metric(harness: Harness, name: str, **labels: str) -> float:
    value = harness.app[keys.METRICS].registry.get_sample_value(name, labels)
    return value or 0.0


def test_without_a_key_the_server_uses_the_local_model() -> None:
    assert isinstance(make_provider(load({}, {})), LocalProvider)
    keyed = load({}, {"GOOGLE_API_KEY": "k1"})
    assert keyed.gemini.api_key == "k1" and isinstance(make_provider(keyed), GeminiSseProvider)
    chat = load({}, {"CHAT_GEMINI_API_KEY": "k2", "GEMINI_API_KEY": "k3"})
    assert chat.gemini.api_key == "k2"
    assert load({}, {"GEMINI_API_KEY": "k3"}).gemini.api_key == "k3"
    sdk = Settings.of(gemini_api_key="k", gemini_transport="sdk")
    assert isinstance(make_provider(sdk), GeminiProvider)
    assert sdk.public_dict()["gemini_api_key"] == "***"


async def test_a_reply_streams_from_gemini_and_its_usage_is_stored(
    gemini: Harness, fake: FakeGemini
) -> None:
    question = "what is a budget " + " ".join(f"w{i}" for i in range(80))  # not routed
    fake.script(Stream(["A budget ", "is a ", "plan."], usage=(31, 7), pace_s=0.005))
    _, _, reply = await _ask(gemini, "alice", question)
    assert reply.end is not None and reply.end.message is not None
    assert reply.text == "A budget is a plan." == reply.end.message.text
    assert reply.end.finish_reason == "stop"
    assert reply.end.usage == Usage(31, 7) == reply.end.message.usage
    assert reply.start is not None and reply.start.model == "gemini-2.5-flash"
    assert reply.end.message.model == "gemini-2.5-flash"
    body = fake.requests[0].body
    assert body["contents"] == [{"role": "user", "parts": [{"text": question}]}]
    assert body["systemInstruction"]["parts"][0]["text"].startswith("You are a helpful")
    assert camel_keys(body["generationConfig"]) == {
        "temperature": 0.7,
        "maxOutputTokens": 1024,
        # the built-in agent: every output token for the answer, nothing to wait for
        "thinkingConfig": {"includeThoughts": False, "thinkingBudget": 0},
    }
    flash = {"model": "gemini-2.5-flash"}
    assert _metric(gemini, "chat_tokens_total", **flash, direction="input") == 31
    assert _metric(gemini, "chat_tokens_total", **flash, direction="output") == 7
    # the user's daily usage, kept by the store from the stored reply
    await outbox_drained(gemini.app)
    day = reply.end.message.created_at[:10]
    assert await gemini.app[keys.STORE].usage_on("alice", day) == 31 + 7


async def test_cancel_closes_the_upstream_connection_within_100ms(
    gemini: Harness, fake: FakeGemini
) -> None:
    fake.script(Stream([f"w{i} " for i in range(400)], pace_s=0.01))
    conv = await gemini.conversation("alice", members=["bob"])
    alice = await gemini.connect("alice")
    bob = await gemini.connect("bob")
    await alice.join(conv)
    await bob.join(conv)
    await alice.send(conv, "tell me a long story about many things")
    start = await bob.expect(GenStart)
    await bob.expect(Delta, lambda d: d.seq >= 2)
    sent = time.monotonic()
    await bob.cancel(start.generation_id)
    gone = await fake.wait_disconnect(0)
    assert gone - sent < 0.1, f"upstream closed {1000 * (gone - sent):.0f} ms after the cancel"
    end = await alice.expect(GenEnd, lambda e: e.generation_id == start.generation_id)
    assert end.finish_reason == "cancelled" and end.message is not None
    assert end.message.text.startswith("w0 w1 ")
    assert fake.requests[0].chunks_sent < 400


async def test_failures_end_the_reply_with_error_and_keep_the_partial_text(
    gemini: Harness, fake: FakeGemini
) -> None:
    long = " ".join(["word"] * 60)
    fake.script(Status(503), Status(503), Status(503), Status(503))
    _, _, failed = await _ask(gemini, "alice", long)
    assert failed.end is not None and failed.end.finish_reason == "error"
    assert "after 4 attempts" in (failed.end.error or "")
    assert failed.end.message is not None and failed.end.message.finish_reason == "error"
    assert len(fake.requests) == 4  # 1 + CHAT_GEMINI_RETRIES (3)

    fake.script(Stream(["kept ", "part ", "lost"], drop_after=2, pace_s=0.01))
    _, _, cut = await _ask(gemini, "bob", long)
    assert cut.end is not None and cut.end.message is not None
    assert (cut.end.finish_reason, cut.end.message.text) == ("error", "kept part ")
    assert _metric(gemini, "chat_replies_total", finish_reason="error") == 2


async def test_safety_and_max_tokens_reach_the_client(gemini: Harness, fake: FakeGemini) -> None:
    long = " ".join(["word"] * 60)
    fake.script(Stream(["no"], finish="SAFETY"), Stream(["cut ", "short"], finish="MAX_TOKENS"))
    _, _, blocked = await _ask(gemini, "alice", long)
    _, _, short = await _ask(gemini, "bob", long)
    assert blocked.end is not None and blocked.end.finish_reason == "safety"
    assert short.end is not None and short.end.finish_reason == "length"


async def test_a_short_first_turn_goes_to_the_light_model(
    make_harness: MakeHarness, fake: FakeGemini
) -> None:
    harness = await _gemini(make_harness, fake, light_max_chars=40, response_cache_ttl_s=0)
    alice, conv, first = await _ask(harness, "alice", "hi, what can you do?")
    assert first.start is not None and first.start.model == "gemini-2.5-flash-lite"
    assert first.end is not None and first.end.message is not None
    assert first.end.message.model == "gemini-2.5-flash-lite"
    assert fake.requests[0].model == "gemini-2.5-flash-lite"
    # the second turn of the same conversation uses the main model, however short
    ack = await alice.send(conv, "and?")
    second = await alice.reply(ack.message_id)
    assert second.end is not None and second.end.message is not None
    assert second.end.message.model == "gemini-2.5-flash" == fake.requests[1].model
    # a long first turn too
    _, _, long = await _ask(harness, "bob", "x" * 41)
    assert long.start is not None and long.start.model == "gemini-2.5-flash"
    # history shows which model answered
    page = await alice.history(conv)
    assert [m.model for m in page.messages if m.role == "assistant"] == [
        "gemini-2.5-flash-lite",
        "gemini-2.5-flash",
    ]
    routed = "chat_model_routed_total"
    assert _metric(harness, routed, agent="general", model="gemini-2.5-flash-lite", route="light")
    assert _metric(harness, routed, agent="general", model="gemini-2.5-flash", route="default") == 2


async def test_a_repeated_first_question_is_answered_from_the_cache(
    gemini: Harness, fake: FakeGemini
) -> None:
    _, _, first = await _ask(gemini, "alice", "What is  a Budget?")
    _, _, again = await _ask(gemini, "bob", "  what is a budget? ")  # normalised: the same
    assert len(fake.requests) == 1, "the second answer came from the cache"
    assert first.end is not None and again.end is not None and again.end.message is not None
    assert again.text == first.text == again.end.message.text
    assert again.end.finish_reason == "stop" and again.end.usage == Usage(0, 0)
    assert again.end.message.usage == Usage(0, 0)
    assert again.start is not None and again.end.message.model == again.start.model
    assert _metric(gemini, "chat_model_cache_hits_total", agent="general") == 1
    assert _metric(gemini, "chat_model_cache_misses_total", agent="general") == 1
    # a different question, a follow-up turn and a non-cacheable agent all ask the model
    alice, conv, _ = await _ask(gemini, "alice", "what is a loan?")
    ack = await alice.send(conv, "what is a budget?")
    await alice.reply(ack.message_id)
    assert len(fake.requests) == 3


async def test_a_non_cacheable_agent_never_hits_the_cache(
    gemini: Harness, fake: FakeGemini
) -> None:
    for user in ("alice", "bob", "carol"):
        await _ask(gemini, user, "how do I save money?", agent="finance-helper")
    assert len(fake.requests) == 3
    assert _metric(gemini, "chat_model_cache_hits_total", agent="finance-helper") == 0


async def test_only_whole_answers_are_cached(gemini: Harness, fake: FakeGemini) -> None:
    fake.script(Stream(["trunc"], finish="MAX_TOKENS"))
    await _ask(gemini, "alice", "same question")
    await _ask(gemini, "bob", "same question")  # the truncated answer was not kept
    await _ask(gemini, "carol", "same question")  # the whole one was
    assert len(fake.requests) == 2


async def test_the_ai_health_check_is_a_cached_probe(
    make_harness: MakeHarness, fake: FakeGemini
) -> None:
    harness = await _gemini(make_harness, fake, gemini_probe_model="gemini-2.5-flash-lite")
    for _ in range(3):
        async with harness.http.get(harness.base_url + "/api/health") as response:
            body = await response.json()
            assert response.status == 200, body
    assert body["checks"]["ai"] == {"status": "ok", "backend": "gemini-sse"}
    assert fake.probes == 1

    fake.probe_status = 500
    down = await _gemini(make_harness, fake)
    async with down.http.get(down.base_url + "/api/health") as response:
        body = await response.json()
    assert response.status == 503 and body["checks"]["ai"]["status"] == "down"
    assert "500" in body["checks"]["ai"]["error"]


async def test_a_retryable_model_error_before_any_text_is_retried_then_answered(
    gemini: Harness, fake: FakeGemini
) -> None:
    # The request was answered 200, then an error event came before any text: retried like
    # a status by the requests' own retries, on both transports (the SDK's request goes out
    # on its first read, where a status and an error event look alike: both are ours now).
    fake.script(Stream(["never"], error_after=0, error_code=503), Stream(["fine ", "answer"]))
    _, _, reply = await _ask(gemini, "alice", "are you there")
    assert reply.end is not None and reply.end.finish_reason == "stop", reply.end
    assert reply.end.message is not None and reply.end.message.text == "fine answer"
    assert len(fake.requests) == 2
    provider = gemini.app[keys.GENERATION].provider.name
    assert _metric(gemini, "chat_model_retries_total", provider=provider) == 1
    assert _metric(gemini, "chat_reply_jobs_retried_total") == 0


async def test_a_client_error_is_not_retried(gemini: Harness, fake: FakeGemini) -> None:
    fake.script(Stream(["never"], error_after=0, error_code=400), Stream(["not asked"]))
    _, _, reply = await _ask(gemini, "alice", "are you there")
    assert reply.end is not None and reply.end.finish_reason == "error"
    assert len(fake.requests) == 1
    assert _metric(gemini, "chat_reply_jobs_retried_total") == 0
