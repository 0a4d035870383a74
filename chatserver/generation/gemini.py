"""Gemini through Google's Gen AI SDK (``google-genai``), behind the Provider interface.

One request = one ``client.aio.models.generate_content_stream`` call:

- the agent's system prompt is the system instruction, the conversation's window the
  contents (``user`` / ``model`` turns), temperature, max output tokens and the thinking
  budget the agent's (thoughts never asked for);
- the SDK makes one request per call (``HttpRetryOptions(attempts=1)``: none of its hidden
  retries); the retries are ours, the same as the SSE path's (``gemini_retry.Tries``: a
  429/5xx answer, or an error event, or a connection failure before the first chunk, after
  a backoff or the ``RetryInfo`` Google asked for, within the retry budget, each admitted
  by the model guard); a failure after the first chunk is never retried; automatic function
  calling and automatic continuation are off (no hidden requests);
- no data for ``timeout_s`` (``thinking_timeout_s`` for the first chunk of a reply that may
  think) ends the reply with ``error``; a cut connection or a stream that ends without a
  finish reason too: never a silent success;
- the stream runs in the caller's task (the manager's producer task): ``task.cancel()``
  raises inside the SDK's read, which closes the HTTP connection at once. (Breaking out of
  the SDK's iterator does not close it: the connection would stay open until collected.)

The mapping from Gemini's answer to a ``Finish`` is shared with the lean SSE path
(``gemini_sse.py``) in ``gemini_answer.py``: both must behave the same against the same
fake server.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from protocol import FinishReason

from ..limits.model_guard import ModelGuard
from ..ops.metrics import Metrics
from .gemini_answer import Tally, error_kind
from .gemini_common import (
    API_VERSION,
    PROBE_TIMEOUT_S,
    CachedProbe,
    GeminiConfig,
    contents_of,
    may_think,
    new_session,
)
from .gemini_retry import ModelBusyError, Tries
from .provider import Chunk, Finish, ReplyRequest, StreamItem


class GeminiProvider:
    """Replies from Gemini through ``google-genai``."""

    name = "gemini"
    # The SDK's stream closed at a yield leaves its HTTP response open until it is
    # read to the end (measured against the fake): no early calls on this transport.
    closes_between_items = False

    def __init__(
        self,
        config: GeminiConfig,
        metrics: Metrics | None = None,
        guard: ModelGuard | None = None,
    ) -> None:
        self.config = config
        self._metrics = metrics
        self._guard = guard
        self._client: Any = None
        self._session: aiohttp.ClientSession | None = None
        self.active = 0
        self.probe = CachedProbe(self._probe_once, config.probe_ttl_s)

    def _genai(self) -> Any:
        """The SDK client, made on first use (its aiohttp session needs the running loop)."""
        if self._client is None:
            from google import genai
            from google.genai import types

            self._session = new_session()
            self._client = genai.Client(
                api_key=self.config.api_key,
                http_options=types.HttpOptions(
                    base_url=self.config.url,
                    api_version=API_VERSION,
                    aiohttp_client=self._session,
                    # One request per call: the retries are ours (RetryInfo, the guard).
                    retry_options=types.HttpRetryOptions(attempts=1),
                ),
            )
        return self._client

    def _config(self, request: ReplyRequest) -> Any:
        from google.genai import types

        thinking = None
        if request.thinking_budget is not None:
            thinking = types.ThinkingConfig(
                thinking_budget=request.thinking_budget, include_thoughts=False
            )
        return types.GenerateContentConfig(
            system_instruction=request.system_prompt or None,
            temperature=request.temperature,
            max_output_tokens=request.max_output_tokens,
            thinking_config=thinking,
            automatic_function_calling=types.AutomaticFunctionCallingConfig(disable=True),
            automatic_continuation=False,
        )

    def thinks(self, model: str, thinking_budget: int | None) -> bool:
        return may_think(model, thinking_budget)

    async def stream(self, request: ReplyRequest) -> AsyncIterator[StreamItem]:
        client = self._genai()
        thinking = may_think(request.model, request.thinking_budget)
        tries = Tries(self.config.retry, request.model, self._guard, self._on_guard)
        timeout_s = self.config.timeout_s
        first_wait_s = self.config.first_wait_s(thinking)
        contents = contents_of(request.history)
        config = self._config(request)
        loop = asyncio.get_running_loop()
        tally = Tally()
        failure: Exception | None = None
        self.active += 1
        try:
            while True:  # one request a turn: retried while no text has streamed
                tally = Tally()
                responses: Any = None
                delay: float | None = None
                try:
                    await tries.admit()
                    # The SDK sends the request on the first read: until the first chunk,
                    # one deadline covers the request, the headers and any thinking.
                    first_by = loop.time() + first_wait_s
                    responses = await client.aio.models.generate_content_stream(
                        model=request.model, contents=contents, config=config
                    )
                    while True:
                        deadline = loop.time() + timeout_s if tally.chunks else first_by
                        try:
                            async with asyncio.timeout_at(deadline):
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
                    if not tally.chunks and not isinstance(exc, ModelBusyError):
                        delay = tries.next_delay(exc)
                    if delay is None:
                        failure = exc
                finally:
                    tries.release()
                    if responses is not None:
                        # Closed at a `yield` (the consumer went away) or failed: close the
                        # SDK's generators now rather than whenever the collector gets to them.
                        with contextlib.suppress(Exception):
                            await responses.aclose()
                if delay is None:
                    break
                if self._metrics is not None:
                    self._metrics.model_retries.labels(self.name).inc()
                await asyncio.sleep(delay)
            if failure is not None:
                waited = timeout_s if tally.chunks else first_wait_s
                finish = tally.failed(failure, tries, waited, thinking)
                self._count_error(finish, failure)
            else:
                finish = tally.ended()
                if finish.reason == FinishReason.ERROR:
                    self._count_error(finish)
            yield finish
        finally:
            self.active -= 1

    def _on_guard(self, model: str, limit: str, outcome: str) -> None:
        if self._metrics is not None:
            self._metrics.model_throttled.labels(model, limit, outcome).inc()

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
