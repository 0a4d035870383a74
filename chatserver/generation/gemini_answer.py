"""Gemini's answer as the contract's: chunks, usage (thinking apart), finish reasons, and
failures as errors that say what happened. Shared by both transports."""

from __future__ import annotations

from typing import Any

import aiohttp

from protocol import FinishReason, ReplyErrorCode, Usage

from .gemini_retry import RETRY_ERRORS, ModelBusyError, Tries
from .local import count_tokens
from .provider import Finish

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


class GeminiStreamError(Exception):
    """An error answer (an HTTP status, or an ``error`` event inside the stream); the body
    is kept as ``details``, as the SDK's ``APIError`` keeps it (``RetryInfo`` is in it)."""

    def __init__(self, code: int, status: str, message: str, details: Any = None) -> None:
        super().__init__(f"{code} {status}: {message}".replace("  ", " "))
        self.code = code
        self.status = status
        self.message = message
        self.details = details

    @classmethod
    def from_body(cls, code: int, body: Any) -> GeminiStreamError:
        error = body.get("error", body) if isinstance(body, dict) else {}
        if not isinstance(error, dict):
            error = {}
        return cls(
            int(error.get("code") or code),
            str(error.get("status") or ""),
            str(error.get("message") or body)[:300],
            body,
        )


class Tally:
    """What one request's stream said so far; turns its end (or its failure) into a
    ``Finish``."""

    __slots__ = ("blocked", "chunks", "finish", "output", "prompt", "streamed", "thoughts")

    def __init__(self) -> None:
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
        # Thinking tokens are billed as output: every token the product pays for counts
        # (``Finish.thinking_tokens`` says how many of them were thinking).
        return Usage(self.prompt or 0, output + self.thoughts)

    def _finish(
        self, reason: FinishReason, error: str | None = None, code: str | None = None
    ) -> Finish:
        return Finish(reason, self.usage(), error, error_code=code, thinking_tokens=self.thoughts)

    def ended(self) -> Finish:
        if self.blocked is not None:
            return self._finish(FinishReason.SAFETY, f"prompt blocked: {self.blocked}")
        reason = self.finish
        if reason is None:
            return self._finish(
                FinishReason.ERROR,
                "the model stream ended without a finish reason",
                ReplyErrorCode.MODEL_UNAVAILABLE,
            )
        if reason == "STOP":
            return self._finish(FinishReason.STOP)
        if reason == "MAX_TOKENS":
            return self._finish(FinishReason.LENGTH)
        if reason in _SAFETY:
            return self._finish(FinishReason.SAFETY, f"stopped by the model: {reason}")
        return self._finish(FinishReason.ERROR, f"the model stopped: {reason}")

    def failed(self, exc: BaseException, tries: Tries, wait_s: float, thinking: bool) -> Finish:
        """The reply's end after ``exc``: the last request ``tries`` made failed (after
        ``wait_s`` without data, for a timeout)."""
        gave_up = tries.gave_up
        code: str = ReplyErrorCode.MODEL_UNAVAILABLE
        retry_after_ms: int | None = None
        if not self.chunks and gave_up is not None:
            code, retry_after_ms = gave_up.code, gave_up.retry_after_ms
        return Finish(
            FinishReason.ERROR,
            self.usage(),
            self.describe(exc, tries, wait_s, thinking),
            # Another attempt of the reply (manager): only a first chunk that never came,
            # which the requests' own retries leave alone. Not after a thinking wait, which
            # is long already; never a refusal for the rate, which only more requests spend.
            retryable=not self.chunks and isinstance(exc, TimeoutError) and not thinking,
            error_code=code,
            retry_after_ms=retry_after_ms,
            thinking_tokens=self.thoughts,
        )

    def describe(self, exc: BaseException, tries: Tries, wait_s: float, thinking: bool) -> str:
        """What happened, truthfully: the requests made, the waits asked for."""
        code = getattr(exc, "code", None)
        made = tries.made
        attempts = f"after {made} attempt{'s' if made != 1 else ''}"
        if isinstance(exc, ModelBusyError):
            retry_after_ms = tries.gave_up.retry_after_ms if tries.gave_up else None
            when = f": try again in {retry_after_ms / 1000:g} s" if retry_after_ms else ""
            before = f" {attempts}" if made else ""  # the requests it let through failed
            return f"model rate limited{before}: {exc}{when}"[:500]
        if isinstance(exc, TimeoutError):
            what = f"no data from the model for {wait_s:g} s"
            if thinking and not self.chunks:
                what += " (it may think before it writes: CHAT_GEMINI_THINKING_TIMEOUT_S)"
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
        gave_up = tries.gave_up
        why = gave_up.why if gave_up is not None else ""
        if why:
            what = what.rstrip(". ")
        if code == 429:
            return f"model rate limited {attempts}: {what}{why}"[:500]
        retried_kind = (
            code in tries.policy.status_codes
            if isinstance(code, int)
            else isinstance(exc, RETRY_ERRORS) and not isinstance(exc, TimeoutError)
        )
        if retried_kind or why:
            return f"model unavailable {attempts}: {what}{why}"[:500]
        if made > 1:
            return f"model request failed {attempts}: {what}"[:500]
        return f"model request failed: {what}"[:500]


def error_kind(finish: Finish, exc: BaseException | None = None) -> str:
    """A small label for the error metric."""
    if isinstance(exc, ModelBusyError):
        return "throttled"
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
