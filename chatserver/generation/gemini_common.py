"""What both Gemini paths share (the SDK's, ``gemini.py``, and the lean SSE one,
``gemini_sse.py``): configuration, the retry policy, the request body, the mapping from
Gemini's answer to a ``Finish`` (``Tally``), error kinds, the cached health probe and the
HTTP session. Both must behave the same against the same fake server.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from protocol import FinishReason, Role, Usage

from .local import count_tokens
from .provider import Finish, ReplyRequest, is_retryable

API_VERSION = "v1beta"
DEFAULT_BASE_URL = "https://generativelanguage.googleapis.com"
RETRY_STATUS_CODES = (429, 500, 502, 503, 504)
MAX_CONNECTIONS = 2000  # upstream connections per instance: one per running reply
PROBE_TIMEOUT_S = 2.0

# Gemini finish reasons that mean "the content was filtered": the contract's `safety`.
_SAFETY = frozenset(
    {
        "SAFETY",
        "RECITATION",
        "BLOCKLIST",
        "PROHIBITED_CONTENT",
        "SPII",
        "IMAGE_SAFETY",
        "IMAGE_PROHIBITED_CONTENT",
        "IMAGE_RECITATION",
        "MODEL_ARMOR",
        "JAILBREAK",
    }
)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Retries of a request answered 429/5xx (or not reached) before any byte streamed."""

    attempts: int = 4  # the first try included
    initial_s: float = 0.5
    max_s: float = 8.0
    exp_base: float = 2.0
    jitter_s: float = 0.1
    status_codes: tuple[int, ...] = RETRY_STATUS_CODES

    def delay(self, retry: int) -> float:
        """Sleep before retry number ``retry`` (1, 2 ...): tenacity's wait_exponential_jitter."""
        base = self.initial_s * self.exp_base ** (retry - 1)
        return float(min(self.max_s, base + random.uniform(0, self.jitter_s)))


@dataclass(frozen=True, slots=True)
class GeminiConfig:
    api_key: str
    base_url: str | None = None  # None: Google's endpoint
    timeout_s: float = 30.0  # no data for this long: the reply ends with error
    retry: RetryPolicy = RetryPolicy()
    probe_model: str = "gemini-2.5-flash-lite"
    probe_ttl_s: float = 30.0

    @property
    def url(self) -> str:
        return (self.base_url or DEFAULT_BASE_URL).rstrip("/")


# -- the request ---------------------------------------------------------------------------


def contents_of(history: Sequence[Any]) -> list[dict[str, Any]]:
    """The window as Gemini contents: assistant turns are ``model``, the rest ``user``;
    empty texts (a reply cancelled before its first word) are left out and consecutive
    turns of one role merged, as the API expects alternating turns."""
    contents: list[dict[str, Any]] = []
    for message in history:
        if not message.text:
            continue
        role = "model" if message.role == Role.ASSISTANT.value else "user"
        if contents and contents[-1]["role"] == role:
            contents[-1]["parts"].append({"text": message.text})
        else:
            contents.append({"role": role, "parts": [{"text": message.text}]})
    return contents


def request_body(request: ReplyRequest) -> dict[str, Any]:
    """The REST body of ``streamGenerateContent``, exactly as the SDK builds it."""
    body: dict[str, Any] = {"contents": contents_of(request.history)}
    if request.system_prompt:
        body["systemInstruction"] = {"parts": [{"text": request.system_prompt}], "role": "user"}
    body["generationConfig"] = {
        "temperature": request.temperature,
        "maxOutputTokens": request.max_output_tokens,
    }
    return body


# -- the answer ----------------------------------------------------------------------------


class GeminiStreamError(Exception):
    """An error answer (an HTTP status, or an ``error`` event inside the stream)."""

    def __init__(self, code: int, status: str, message: str) -> None:
        super().__init__(f"{code} {status}: {message}".replace("  ", " "))
        self.code = code
        self.status = status
        self.message = message

    @classmethod
    def from_body(cls, code: int, body: Any) -> GeminiStreamError:
        error = body.get("error", body) if isinstance(body, dict) else {}
        if not isinstance(error, dict):
            error = {}
        return cls(
            int(error.get("code") or code),
            str(error.get("status") or ""),
            str(error.get("message") or body)[:300],
        )


class Tally:
    """What one stream said so far; turns its end (or its failure) into a ``Finish``."""

    __slots__ = (
        "blocked",
        "chunks",
        "finish",
        "opened",
        "output",
        "prompt",
        "streamed",
        "thoughts",
    )

    def __init__(self) -> None:
        # The request was answered 200: a later error status (an error event) was not
        # retried by the request's own retries, which give up only on statuses before it.
        self.opened = False
        self.chunks = 0
        self.streamed: list[str] = []
        self.finish: str | None = None
        self.blocked: str | None = None
        self.prompt: int | None = None
        self.output: int | None = None
        self.thoughts = 0

    def usage_from(self, usage: Any) -> None:
        """``usageMetadata`` (a dict from REST); running totals: the last one wins."""
        prompt = usage.get("promptTokenCount")
        if prompt is not None:
            self.prompt = int(prompt)
        output = usage.get("candidatesTokenCount")
        if output is not None:
            self.output = int(output)
        thoughts = usage.get("thoughtsTokenCount")
        if thoughts is not None:
            self.thoughts = int(thoughts)

    def usage(self) -> Usage:
        output = self.output
        if output is None:  # cut short before the final usage: estimate what we received
            output = count_tokens("".join(self.streamed)) if self.streamed else 0
        # Thinking tokens are billed as output: every token the product pays for counts.
        return Usage(self.prompt or 0, output + self.thoughts)

    def ended(self) -> Finish:
        usage = self.usage()
        if self.blocked is not None:
            return Finish(FinishReason.SAFETY, usage, f"prompt blocked: {self.blocked}")
        reason = self.finish
        if reason is None:
            return Finish(
                FinishReason.ERROR, usage, "the model stream ended without a finish reason"
            )
        if reason == "STOP":
            return Finish(FinishReason.STOP, usage)
        if reason == "MAX_TOKENS":
            return Finish(FinishReason.LENGTH, usage)
        if reason in _SAFETY:
            return Finish(FinishReason.SAFETY, usage, f"stopped by the model: {reason}")
        return Finish(FinishReason.ERROR, usage, f"the model stopped: {reason}")

    def failed(self, exc: BaseException, config: GeminiConfig) -> Finish:
        return Finish(
            FinishReason.ERROR,
            self.usage(),
            self.describe(exc, config),
            retryable=self.retryable(exc, config),
        )

    def retryable(self, exc: BaseException, config: GeminiConfig) -> bool:
        """Worth another attempt of the reply: nothing streamed yet, a retryable error
        (``provider.is_retryable``), and not a status the request's own retries (at most
        ``CHAT_GEMINI_RETRIES`` + 1 requests) already gave up on."""
        code = getattr(exc, "code", None)
        retried = isinstance(code, int) and code in config.retry.status_codes and not self.opened
        return not self.chunks and not retried and is_retryable(exc)

    def describe(self, exc: BaseException, config: GeminiConfig) -> str:
        code = getattr(exc, "code", None)
        if isinstance(exc, TimeoutError):
            what = f"no data from the model for {config.timeout_s:g} s"
        elif isinstance(exc, aiohttp.ClientPayloadError):
            what = f"the connection to the model was cut: {exc}"
        elif isinstance(exc, (aiohttp.ClientError, OSError)):
            what = f"cannot reach the model: {type(exc).__name__}: {exc}"
        elif isinstance(code, int):  # google.genai.errors.APIError or GeminiStreamError
            status = getattr(exc, "status", None) or ""
            what = f"{code} {status}: {getattr(exc, 'message', None) or exc}".replace("  ", " ")
        else:
            what = f"{type(exc).__name__}: {exc}"
        if self.chunks:
            return f"model stream failed after {self.chunks} chunks: {what}"[:500]
        if isinstance(code, int) and code in config.retry.status_codes:
            return f"model unavailable after {config.retry.attempts} attempts: {what}"[:500]
        return f"model request failed: {what}"[:500]


def error_kind(finish: Finish, exc: BaseException | None = None) -> str:
    """A small label for the error metric."""
    code = getattr(exc, "code", None)
    if isinstance(code, int):
        return "rate_limited" if code == 429 else "server" if code >= 500 else "client"
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, (aiohttp.ClientError, OSError)):
        return "connection"
    if exc is not None:
        return "other"
    return "no_finish" if "without a finish" in (finish.error or "") else "stopped"


class CachedProbe:
    """A cheap upstream call for the health check, made at most once per ``ttl_s``.

    Success is remembered for ``ttl_s``, a failure for at most 5 s; concurrent checks share
    one call, and a caller that times out does not cancel it.
    """

    def __init__(
        self,
        call: Callable[[], Awaitable[None]],
        ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._call = call
        self._ttl_s = ttl_s
        self._clock = clock
        self._until = 0.0
        self._error: str | None = None
        self._running: asyncio.Task[None] | None = None
        self.calls = 0

    @property
    def healthy(self) -> bool:
        return self._error is None

    async def __call__(self) -> None:
        if self._clock() >= self._until:
            if self._running is None:
                self._running = asyncio.create_task(self._run())
            await asyncio.shield(self._running)
        if self._error is not None:
            raise ConnectionError(self._error)

    async def _run(self) -> None:
        self.calls += 1
        try:
            await self._call()
        except Exception as exc:
            self._error = f"{type(exc).__name__}: {exc}"[:200]
            self._until = self._clock() + min(self._ttl_s, 5.0)
        else:
            self._error = None
            self._until = self._clock() + self._ttl_s
        finally:
            self._running = None


def new_session(timeout: aiohttp.ClientTimeout | None = None) -> aiohttp.ClientSession:
    """The upstream HTTP client: one pool per instance; no proxy variables (explicit
    ``CHAT_GEMINI_BASE_URL`` instead), a large read buffer for long SSE lines."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=MAX_CONNECTIONS, limit_per_host=0),
        timeout=timeout or aiohttp.ClientTimeout(total=None),
        read_bufsize=1 << 20,
    )


# -- the SDK provider ----------------------------------------------------------------------
