"""The lean Gemini path: the same REST endpoint as the SDK, read with aiohttp and ``json``.

``POST {base}/v1beta/{name}:streamGenerateContent?alt=sse`` (``name``: ``models/<id>`` or
``tunedModels/<id>``) with the SDK's body and ``x-goog-api-key``; the answer is Server-Sent
Events, one JSON object per ``data:`` line.
The SDK spends ~330 µs of CPU per chunk (pydantic models, several generator layers); this
path parses the same events for a fraction of that. Same contract as ``GeminiProvider``
(``gemini.py``): same retries (``gemini_retry.Tries``: 429/5xx or an error event before the
first chunk, capped exponential backoff with jitter or Google's ``RetryInfo``), same
timeouts, same mapping of the answer to a ``Finish``; cancelling the task closes the
connection (``finally: response.close()``). Selected with ``CHAT_GEMINI_TRANSPORT=sse``
(the default).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import aiohttp

from protocol import FinishReason

from ..limits.model_guard import ModelGuard
from ..ops.metrics import Metrics
from .gemini_answer import GeminiStreamError, Tally, error_kind
from .gemini_common import (
    API_VERSION,
    PROBE_TIMEOUT_S,
    CachedProbe,
    GeminiConfig,
    may_think,
    model_path,
    new_session,
    request_body,
)
from .gemini_retry import ModelBusyError, Tries
from .provider import Chunk, Finish, ReplyRequest, StreamItem


class GeminiSseProvider:
    name = "gemini-sse"
    closes_between_items = True  # its own response, closed in its finally

    def __init__(
        self,
        config: GeminiConfig,
        metrics: Metrics | None = None,
        guard: ModelGuard | None = None,
    ) -> None:
        self.config = config
        self._metrics = metrics
        self._guard = guard
        self._session: aiohttp.ClientSession | None = None
        self._headers = {
            "Content-Type": "application/json",
            "x-goog-api-key": config.api_key,
            "User-Agent": "chatserver-gemini-sse",
        }
        # sock_read bounds the wait for the headers and for each read of the body; a reply
        # that may think waits longer for its first chunk (the headers included).
        self._timeouts = {
            thinking: aiohttp.ClientTimeout(
                total=None, sock_connect=config.timeout_s, sock_read=config.first_wait_s(thinking)
            )
            for thinking in (False, True)
        }
        self.active = 0
        self.probe = CachedProbe(self._probe_once, config.probe_ttl_s)

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = new_session(self._timeouts[False])
        return self._session

    def _url(self, model: str, method: str) -> str:
        return f"{self.config.url}/{API_VERSION}/{model_path(model)}{method}"

    def thinks(self, model: str, thinking_budget: int | None) -> bool:
        return may_think(model, thinking_budget)

    async def stream(self, request: ReplyRequest) -> AsyncIterator[StreamItem]:
        thinking = may_think(request.model, request.thinking_budget)
        tries = Tries(self.config.retry, request.model, self._guard, self._on_guard)
        body = json.dumps(request_body(request), separators=(",", ":")).encode()
        url = self._url(request.model, ":streamGenerateContent?alt=sse")
        tally = Tally()
        failure: Exception | None = None
        self.active += 1
        try:
            while True:  # one request a turn: retried while no text has streamed
                tally = Tally()
                response: aiohttp.ClientResponse | None = None
                clean = False
                delay: float | None = None
                try:
                    await tries.admit()
                    response = await self._post(url, body, thinking)
                    async for text in _events(response.content, tally):
                        tally.chunks += 1
                        if tally.chunks == 1 and thinking:
                            _read_timeout(response, self.config.timeout_s)
                        tally.streamed.append(text)
                        yield Chunk(text)
                    clean = True
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    if not tally.chunks and not isinstance(exc, ModelBusyError):
                        delay = tries.next_delay(exc)
                    if delay is None:
                        failure = exc
                finally:
                    tries.release()
                    if response is not None:
                        if clean:
                            response.release()  # read to the end: the connection is reused
                        else:
                            response.close()  # cancelled or failed: close the connection now
                if delay is None:
                    break
                if self._metrics is not None:
                    self._metrics.model_retries.labels(self.name).inc()
                await asyncio.sleep(delay)
            if failure is not None:
                waited = (
                    self.config.timeout_s if tally.chunks else self.config.first_wait_s(thinking)
                )
                finish = tally.failed(failure, tries, waited, thinking)
                self._count_error(finish, failure)
            else:
                finish = tally.ended()
                if finish.reason == FinishReason.ERROR:
                    self._count_error(finish)
            yield finish
        finally:
            self.active -= 1

    async def _post(self, url: str, body: bytes, thinking: bool) -> aiohttp.ClientResponse:
        """One request; the response once it answered 200 (its body not read)."""
        response = await self._http().post(
            url, data=body, headers=self._headers, timeout=self._timeouts[thinking]
        )
        if response.status == 200:
            return response
        try:
            payload = await response.json(content_type=None)
        except (ValueError, aiohttp.ClientError):
            payload = {"error": {"message": response.reason or ""}}
        finally:
            response.release()
        raise GeminiStreamError.from_body(response.status, payload)

    def _on_guard(self, model: str, limit: str, outcome: str) -> None:
        if self._metrics is not None:
            self._metrics.model_throttled.labels(model, limit, outcome).inc()

    def _count_error(self, finish: Finish, exc: BaseException | None = None) -> None:
        if self._metrics is not None:
            self._metrics.model_errors.labels(self.name, error_kind(finish, exc)).inc()

    async def _probe_once(self) -> None:
        timeout = aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S)
        url = self._url(self.config.probe_model, "")
        async with self._http().get(url, headers=self._headers, timeout=timeout) as response:
            if response.status != 200:
                payload = await response.json(content_type=None)
                raise GeminiStreamError.from_body(response.status, payload)
            await response.read()

    def healthy(self) -> bool:
        return self.probe.healthy

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _read_timeout(response: aiohttp.ClientResponse, seconds: float) -> None:
    """From the first chunk on, each next one is waited for ``seconds`` (the thinking wait
    is over). aiohttp reads the new value when it next re-arms its timer: at once here
    (a private call, guarded), else when the next bytes arrive."""
    connection = response.connection
    protocol = connection.protocol if connection is not None else None
    if protocol is None:
        return
    protocol.read_timeout = seconds
    rearm = getattr(protocol, "_reschedule_timeout", None)
    if callable(rearm):
        rearm()


async def _events(content: aiohttp.StreamReader, tally: Tally) -> AsyncIterator[str]:
    """Texts of the SSE events as they arrive; usage, finish and blocks go to ``tally``.

    Events are ``data:`` lines (several make one event, per the SSE rules) ended by a blank
    line; other fields and comments are ignored. ``\\r\\n`` and ``\\n`` both end a line.
    """
    buffer = b""
    data: list[bytes] = []
    async for block in content.iter_any():
        buffer = buffer + block if buffer else block
        lines = buffer.split(b"\n")
        buffer = lines.pop()
        for raw in lines:
            line = raw[:-1] if raw.endswith(b"\r") else raw
            if line:
                if line.startswith(b"data:"):
                    data.append(line[6:] if line.startswith(b"data: ") else line[5:])
                continue
            if data:
                text = _event(b"\n".join(data) if len(data) > 1 else data[0], tally)
                data.clear()
                if text:
                    yield text
    if buffer.rstrip(b"\r").startswith(b"data:"):
        line = buffer.rstrip(b"\r")
        data.append(line[6:] if line.startswith(b"data: ") else line[5:])
    if data:
        text = _event(b"\n".join(data), tally)
        if text:
            yield text


def _event(payload: bytes, tally: Tally) -> str:
    event = json.loads(payload)
    if "error" in event:
        raise GeminiStreamError.from_body(500, event)
    usage = event.get("usageMetadata")
    if usage is not None:
        tally.usage_from(usage)
    feedback = event.get("promptFeedback")
    if feedback is not None and feedback.get("blockReason"):
        tally.blocked = str(feedback["blockReason"])
    candidates = event.get("candidates")
    if not candidates:
        return ""
    candidate = candidates[0]
    reason = candidate.get("finishReason")
    if reason is not None:
        tally.finish = str(reason)
    parts = (candidate.get("content") or {}).get("parts")
    if not parts:
        return ""
    if len(parts) == 1:
        part = parts[0]
        return "" if part.get("thought") else str(part.get("text") or "")
    return "".join(str(p.get("text") or "") for p in parts if not p.get("thought"))
