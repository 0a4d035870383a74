"""The lean Gemini path: the same REST endpoint as the SDK, read with aiohttp and ``json``.

``POST {base}/v1beta/models/{model}:streamGenerateContent?alt=sse`` with the SDK's body and
``x-goog-api-key``; the answer is Server-Sent Events, one JSON object per ``data:`` line.
The SDK spends ~330 µs of CPU per chunk (pydantic models, several generator layers); this
path parses the same events for a fraction of that. Same contract as ``GeminiProvider``
(``gemini.py``): same retries (429/5xx before the first byte, capped exponential backoff
with jitter), same timeout, same mapping of the answer to a ``Finish``; cancelling the task
closes the connection (``finally: response.close()``). Selected with
``CHAT_GEMINI_TRANSPORT=sse``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from protocol import FinishReason

from ..ops.metrics import Metrics
from .gemini_common import (
    API_VERSION,
    CachedProbe,
    GeminiConfig,
    GeminiStreamError,
    Tally,
    error_kind,
    new_session,
    request_body,
)
from .provider import Chunk, Finish, ReplyRequest, StreamItem

# Failures to reach the server at all, retried like a 429/5xx (as the SDK does).
_RETRY_ERRORS = (
    aiohttp.ClientConnectorError,
    aiohttp.ServerDisconnectedError,
    aiohttp.ClientOSError,
)


class GeminiSseProvider:
    name = "gemini-sse"

    def __init__(self, config: GeminiConfig, metrics: Metrics | None = None) -> None:
        self.config = config
        self._metrics = metrics
        self._session: aiohttp.ClientSession | None = None
        self._headers = {
            "Content-Type": "application/json",
            "x-goog-api-key": config.api_key,
            "User-Agent": "chatserver-gemini-sse",
        }
        # sock_read bounds the wait for the headers and for each read of the body.
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=config.timeout_s, sock_read=config.timeout_s
        )
        self.active = 0
        self.probe = CachedProbe(self._probe_once, config.probe_ttl_s)

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = new_session(self._timeout)
        return self._session

    def _url(self, model: str, method: str) -> str:
        return f"{self.config.url}/{API_VERSION}/models/{model}{method}"

    async def stream(self, request: ReplyRequest) -> AsyncIterator[StreamItem]:
        tally = Tally()
        response: aiohttp.ClientResponse | None = None
        clean = False
        self.active += 1
        try:
            try:
                body = json.dumps(request_body(request), separators=(",", ":")).encode()
                url = self._url(request.model, ":streamGenerateContent?alt=sse")
                response = await self._open(url, body)
                tally.opened = True
                async for text in _events(response.content, tally):
                    tally.chunks += 1
                    tally.streamed.append(text)
                    yield Chunk(text)
                clean = True
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
            if response is not None:
                if clean:
                    response.release()  # read to the end: the connection can be reused
                else:
                    response.close()  # cancelled or failed: close the connection now

    async def _open(self, url: str, body: bytes) -> aiohttp.ClientResponse:
        """POST with retries; the response once it answered 200 (its body not read)."""
        retry = self.config.retry
        session = self._http()
        attempt = 1
        while True:
            try:
                response = await session.post(url, data=body, headers=self._headers)
            except _RETRY_ERRORS:
                if attempt >= retry.attempts:
                    raise
            else:
                if response.status == 200:
                    return response
                try:
                    payload: Any = await response.json(content_type=None)
                except (ValueError, aiohttp.ClientError):
                    payload = {"error": {"message": response.reason or ""}}
                finally:
                    response.release()
                error = GeminiStreamError.from_body(response.status, payload)
                if response.status not in retry.status_codes or attempt >= retry.attempts:
                    raise error
            if self._metrics is not None:
                self._metrics.model_retries.labels(self.name).inc()
            await asyncio.sleep(retry.delay(attempt))
            attempt += 1

    def _count_error(self, finish: Finish, exc: BaseException | None = None) -> None:
        if self._metrics is not None:
            self._metrics.model_errors.labels(self.name, error_kind(finish, exc)).inc()

    async def _probe_once(self) -> None:
        timeout = aiohttp.ClientTimeout(total=2.0)
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
