"""Gemini through Google's Gen AI SDK (``google-genai``), behind the Provider interface.

One reply = one ``client.aio.models.generate_content_stream`` call:

- the agent's system prompt is the system instruction, the conversation's window the
  contents (``user`` / ``model`` turns), temperature and max output tokens the agent's;
- retries are explicit (``HttpRetryOptions``: attempts, delays, 429 and 5xx only); the SDK
  retries only the request itself, so a failure after the first chunk is never retried;
  automatic function calling and automatic continuation are off (no hidden requests);
- no data for ``timeout_s`` (before the first chunk, retries included, or between chunks)
  ends the reply with ``error``; a cut connection or a stream that ends without a finish
  reason too: never a silent success;
- the stream runs in the caller's task (the manager's producer task): ``task.cancel()``
  raises inside the SDK's read, which closes the HTTP connection at once. (Breaking out of
  the SDK's iterator does not close it: the connection would stay open until collected.)

The mapping from Gemini's answer to a ``Finish`` is shared with the lean SSE path
(``gemini_sse.py``) in ``gemini_common.py``: both must behave the same against the same
fake server.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from protocol import FinishReason

from ..ops.metrics import Metrics
from .gemini_common import (
    API_VERSION,
    PROBE_TIMEOUT_S,
    CachedProbe,
    GeminiConfig,
    Tally,
    contents_of,
    error_kind,
    new_session,
)
from .provider import Chunk, Finish, ReplyRequest, StreamItem


class GeminiProvider:
    """Replies from Gemini through ``google-genai``."""

    name = "gemini"

    def __init__(self, config: GeminiConfig, metrics: Metrics | None = None) -> None:
        self.config = config
        self._metrics = metrics
        self._client: Any = None
        self._session: aiohttp.ClientSession | None = None
        self.active = 0
        self.probe = CachedProbe(self._probe_once, config.probe_ttl_s)

    def _genai(self) -> Any:
        """The SDK client, made on first use (its aiohttp session needs the running loop)."""
        if self._client is None:
            from google import genai
            from google.genai import types

            retry = self.config.retry
            self._session = new_session()
            self._client = genai.Client(
                api_key=self.config.api_key,
                http_options=types.HttpOptions(
                    base_url=self.config.url,
                    api_version=API_VERSION,
                    aiohttp_client=self._session,
                    retry_options=types.HttpRetryOptions(
                        attempts=retry.attempts,
                        initial_delay=retry.initial_s,
                        max_delay=retry.max_s,
                        exp_base=retry.exp_base,
                        jitter=retry.jitter_s,
                        http_status_codes=list(retry.status_codes),
                    ),
                ),
            )
        return self._client

    def _config(self, request: ReplyRequest) -> Any:
        from google.genai import types

        return types.GenerateContentConfig(
            system_instruction=request.system_prompt or None,
            temperature=request.temperature,
            max_output_tokens=request.max_output_tokens,
            automatic_function_calling=types.AutomaticFunctionCallingConfig(disable=True),
            automatic_continuation=False,
        )

    async def stream(self, request: ReplyRequest) -> AsyncIterator[StreamItem]:
        client = self._genai()
        tally = Tally()
        timeout_s = self.config.timeout_s
        responses: Any = None
        self.active += 1
        try:
            try:
                responses = await client.aio.models.generate_content_stream(
                    model=request.model,
                    contents=contents_of(request.history),
                    config=self._config(request),
                )
                # ``opened`` stays False: the SDK sends the request on the first read, so an
                # error status and an error event before the first chunk look alike here;
                # both are left to the SDK's request retries.
                while True:
                    try:
                        async with asyncio.timeout(timeout_s):
                            response = await anext(responses)
                    except StopAsyncIteration:
                        break
                    text = _absorb(tally, response)
                    if text:
                        tally.chunks += 1
                        tally.streamed.append(text)
                        yield Chunk(text)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                finish = tally.failed(exc, self.config)
                self._count_error(finish, exc)
                yield finish
                return
            finish = tally.ended()
            if finish.reason == FinishReason.ERROR:
                self._count_error(finish)
            yield finish
        finally:
            self.active -= 1
            if responses is not None:
                # Closed at a `yield` (the consumer went away): close the SDK's generators
                # now rather than whenever the garbage collector gets to them.
                with contextlib.suppress(Exception):
                    await responses.aclose()

    def _count_error(self, finish: Finish, exc: BaseException | None = None) -> None:
        if self._metrics is not None:
            self._metrics.model_errors.labels(self.name, error_kind(finish, exc)).inc()

    async def _probe_once(self) -> None:
        from google.genai import types

        await self._genai().aio.models.get(
            model=self.config.probe_model,
            config=types.GetModelConfig(
                http_options=types.HttpOptions(
                    timeout=int(PROBE_TIMEOUT_S * 1000),
                    retry_options=types.HttpRetryOptions(attempts=1),
                )
            ),
        )

    def healthy(self) -> bool:
        return self.probe.healthy

    async def close(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.aio.aclose()
                self._client.close()  # the SDK's idle sync httpx client
            self._client = None
        if self._session is not None:
            await self._session.close()
            self._session = None


def _absorb(tally: Tally, response: Any) -> str:
    """Record one SDK ``GenerateContentResponse``; return its text."""
    usage = response.usage_metadata
    if usage is not None:
        if usage.prompt_token_count is not None:
            tally.prompt = usage.prompt_token_count
        if usage.candidates_token_count is not None:
            tally.output = usage.candidates_token_count
        if usage.thoughts_token_count is not None:
            tally.thoughts = usage.thoughts_token_count
    feedback = response.prompt_feedback
    if feedback is not None and feedback.block_reason is not None:
        tally.blocked = _enum_value(feedback.block_reason)
    candidates = response.candidates
    if not candidates:
        return ""
    candidate = candidates[0]
    if candidate.finish_reason is not None:
        tally.finish = _enum_value(candidate.finish_reason)
    content = candidate.content
    if content is None or not content.parts:
        return ""
    return "".join(p.text for p in content.parts if p.text and not p.thought)


def _enum_value(value: Any) -> str:
    return str(getattr(value, "value", value))
