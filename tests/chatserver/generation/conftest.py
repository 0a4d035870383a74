"""The Gemini providers' fixtures: the fake Gemini server, and a provider of either transport
talking to it over real HTTP (``make``, parametrised ``sdk`` and ``sse``)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest

from chatserver.generation.gemini import GeminiProvider
from chatserver.generation.gemini_common import GeminiConfig, RetryPolicy
from chatserver.generation.gemini_sse import GeminiSseProvider
from chatserver.generation.provider import Chunk, Finish, ReplyRequest, StreamItem
from chatserver.limits.model_guard import ModelGuard
from chatserver.ops.metrics import Metrics
from protocol import Message
from tests.fakegemini import FakeGemini

GeminiKind = type[GeminiProvider] | type[GeminiSseProvider]
AnyGemini = GeminiProvider | GeminiSseProvider
MakeProvider = Callable[..., AnyGemini]
FAST_RETRY = RetryPolicy(attempts=3, initial_s=0.05, max_s=0.2, jitter_s=0.01)


def message(offset: int, role: str, text: str) -> Message:
    return Message(
        f"m{offset}",
        "c1",
        offset,
        role,
        text,
        "2026-01-01T00:00:00.000Z",
        user_id="u1" if role == "user" else None,
    )


def gemini_request(
    *texts: str,
    model: str = "gemini-2.5-flash",
    max_tokens: int = 100,
    thinking_budget: int | None = None,
) -> ReplyRequest:
    history = tuple(
        message(i + 1, "user" if i % 2 == 0 else "assistant", t) for i, t in enumerate(texts)
    )
    return ReplyRequest(
        "general", model, "Be brief.", history, 0.25, max_tokens, thinking_budget=thinking_budget
    )


async def run_stream(provider: AnyGemini, request: ReplyRequest) -> tuple[str, Finish]:
    """The whole stream: its text and its one ``Finish`` (checked to come last, once)."""
    items: list[StreamItem] = [item async for item in provider.stream(request)]
    finishes = [i for i in items if isinstance(i, Finish)]
    assert len(finishes) == 1 and items[-1] is finishes[0], "exactly one Finish, last"
    return "".join(i.text for i in items if isinstance(i, Chunk)), finishes[0]


@pytest.fixture
async def fake() -> AsyncIterator[FakeGemini]:
    server = FakeGemini()
    await server.start()
    yield server
    await server.close()


@pytest.fixture(params=[GeminiProvider, GeminiSseProvider], ids=["sdk", "sse"])
async def make(request: pytest.FixtureRequest, fake: FakeGemini) -> AsyncIterator[MakeProvider]:
    """``make(guard=..., **GeminiConfig fields)``: a provider on the fake, closed after."""
    kind: GeminiKind = request.param
    made: list[AnyGemini] = []

    def build(guard: ModelGuard | None = None, **overrides: object) -> AnyGemini:
        options: dict[str, object] = {
            "api_key": "test-key",
            "base_url": fake.base_url,
            "timeout_s": 2.0,
            "retry": FAST_RETRY,
        }
        options.update(overrides)
        provider = kind(GeminiConfig(**options), Metrics(), guard)  # type: ignore[arg-type]
        made.append(provider)
        return provider

    yield build
    for provider in made:
        await provider.close()


def camel_keys(value: object) -> object:
    """``value`` with every key in lowerCamelCase: google-genai writes the fields of
    ``thinkingConfig`` by their proto names (``thinking_budget``), which proto JSON (and so
    Google) reads as the documented camelCase ones the lean path writes."""
    if isinstance(value, dict):
        return {_camel(str(k)): camel_keys(v) for k, v in value.items()}
    if isinstance(value, list):
        return [camel_keys(v) for v in value]
    return value


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)
