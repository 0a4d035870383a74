"""The requests of one Gemini reply: admitted by the model guard, retried before the first
chunk, waiting what Google asks (``RetryInfo``) when it fits the retry budget.

Both transports run the same loop: ``admit`` before each request, ``release`` after it, and
on a failure before any text ``next_delay`` says how long to wait before the next request,
or that there is none (``gave_up`` then says why, for the reply's error).
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from protocol import ReplyErrorCode

from ..limits.model_guard import Busy, ModelGuard, Permit

RETRY_STATUS_CODES = (429, 500, 502, 503, 504)
# Failures to reach the server, or a connection cut before any text: retried like a 5xx.
RETRY_ERRORS: tuple[type[BaseException], ...] = (
    aiohttp.ClientConnectorError,
    aiohttp.ServerDisconnectedError,
    aiohttp.ClientOSError,
    aiohttp.ClientPayloadError,
)
log = logging.getLogger("chatserver.generation")

_RETRY_INFO = "type.googleapis.com/google.rpc.RetryInfo"
_DURATION = re.compile(r"\s*(\d+(?:\.\d*)?)s\s*")  # google.protobuf.Duration in JSON: "37s"


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Retries of a request answered 429/5xx (or not reached, or failing before its first
    chunk), each after a capped exponential backoff with jitter, or after the ``retryDelay``
    Google asked for; all the waits of one reply together at most ``budget_s``."""

    attempts: int = 4  # the first try included
    initial_s: float = 0.5
    max_s: float = 8.0
    exp_base: float = 2.0
    jitter_s: float = 0.1
    status_codes: tuple[int, ...] = RETRY_STATUS_CODES
    budget_s: float = 10.0

    def delay(self, retry: int) -> float:
        """Sleep before retry number ``retry`` (1, 2 ...): tenacity's wait_exponential_jitter."""
        base = self.initial_s * self.exp_base ** (retry - 1)
        return float(min(self.max_s, base + random.uniform(0, self.jitter_s)))


def retry_info_delay(exc: BaseException) -> float | None:
    """The ``retryDelay`` (seconds) of the ``google.rpc.RetryInfo`` in an error answer:
    ``{"error": {"details": [{"@type": ".../google.rpc.RetryInfo", "retryDelay": "37s"}]}}``
    (a ``GeminiStreamError`` or the SDK's ``APIError``, both with the body as ``details``)."""
    body: Any = getattr(exc, "details", None)
    if isinstance(body, list) and len(body) == 1:
        body = body[0]
    if not isinstance(body, dict):
        return None
    error = body.get("error", body)
    details = error.get("details") if isinstance(error, dict) else None
    if not isinstance(details, list):
        return None
    for detail in details:
        if isinstance(detail, dict) and detail.get("@type") == _RETRY_INFO:
            delay = detail.get("retryDelay")
            if isinstance(delay, str) and (found := _DURATION.fullmatch(delay)):
                return float(found.group(1))
            if isinstance(delay, dict):  # the proto form: {"seconds": 37, "nanos": 0}
                try:
                    return float(delay.get("seconds", 0)) + float(delay.get("nanos", 0)) / 1e9
                except (TypeError, ValueError):
                    return None
    return None


class ModelBusyError(Exception):
    """This service's guard held the request back longer than the retry budget allows."""

    def __init__(self, model: str, busy: Busy) -> None:
        self.model = model
        self.busy = busy
        if busy.limit == "concurrent":
            what = f"{busy.cap} requests to {model} are running at once, the most allowed"
        else:
            what = f"{busy.cap} requests to {model} a minute, the most allowed, are used up"
        super().__init__(f"this service is busy: {what}")


@dataclass(frozen=True, slots=True)
class GaveUp:
    """Why a failed request was the last one."""

    code: str  # a ReplyErrorCode
    retry_after_ms: int | None
    why: str  # "" when it was simply not retryable; else appended to the error


def _code_of(exc: BaseException) -> str | None:
    code = getattr(exc, "code", None)
    if not isinstance(code, int):
        return (
            ReplyErrorCode.MODEL_UNAVAILABLE
            if isinstance(exc, (TimeoutError, aiohttp.ClientError, OSError))
            else None
        )
    if code == 429:
        return ReplyErrorCode.MODEL_RATE_LIMITED
    if code >= 500 or code == 408:
        return ReplyErrorCode.MODEL_UNAVAILABLE
    return ReplyErrorCode.MODEL_REJECTED


OnEvent = Callable[[str, str, str], None]  # (model, limit, outcome): the guard's metric


class Tries:
    """One reply's requests to ``model``: how many were made, how long was waited."""

    __slots__ = ("_guard", "_on_event", "gave_up", "made", "model", "permit", "policy", "waited_s")

    def __init__(
        self,
        policy: RetryPolicy,
        model: str,
        guard: ModelGuard | None = None,
        on_event: OnEvent | None = None,
    ) -> None:
        self.policy = policy
        self.model = model
        self._guard = guard
        self._on_event = on_event
        self.made = 0  # requests sent (or about to be: counted when admitted)
        self.waited_s = 0.0  # slept between them, and for the guard
        self.permit: Permit | None = None
        self.gave_up: GaveUp | None = None

    def _left_s(self) -> float:
        return self.policy.budget_s - self.waited_s

    async def admit(self) -> None:
        """Before each request: the guard's permit, waiting for it while the budget lasts;
        past it ``ModelBusyError``."""
        if self._guard is None:
            self.made += 1
            return
        waited = False
        while True:
            try:
                verdict = await self._guard.acquire(self.model)
            except Exception as exc:
                # The guard spares the quota; it must not fail replies when Redis blips.
                log.warning("model guard unavailable, request sent unguarded: %s", exc)
                self.made += 1
                return
            if isinstance(verdict, Permit):
                self.permit = verdict
                self.made += 1
                return
            wait_s = verdict.retry_after_ms / 1000
            if wait_s > self._left_s():
                self._event(verdict.limit, "refused")
                busy_for = verdict.retry_after_ms if verdict.limit == "per_minute" else 1000
                self.gave_up = GaveUp(ReplyErrorCode.MODEL_RATE_LIMITED, busy_for, "")
                raise ModelBusyError(self.model, verdict)
            if not waited:
                self._event(verdict.limit, "waited")
            waited = True
            await asyncio.sleep(wait_s)
            self.waited_s += wait_s

    def _event(self, limit: str, outcome: str) -> None:
        if self._on_event is not None:
            self._on_event(self.model, limit, outcome)

    def release(self) -> None:
        permit, self.permit = self.permit, None
        if permit is not None and self._guard is not None:
            self._guard.release(permit)

    def next_delay(self, exc: BaseException) -> float | None:
        """After request ``made`` failed before any text: seconds to wait before the next
        one, or None (no more: ``gave_up`` says why)."""
        code = _code_of(exc)
        status = getattr(exc, "code", None)
        retryable = (
            status in self.policy.status_codes
            if isinstance(status, int)
            else isinstance(exc, RETRY_ERRORS)
        )
        asked = retry_info_delay(exc)
        asked_ms = None if asked is None else max(1, int(asked * 1000))
        if not retryable:
            self.gave_up = GaveUp(code or ReplyErrorCode.MODEL_UNAVAILABLE, asked_ms, "")
            return None
        if self.made >= self.policy.attempts:
            self.gave_up = GaveUp(code or ReplyErrorCode.MODEL_UNAVAILABLE, asked_ms, "")
            return None
        delay = asked if asked is not None else self.policy.delay(self.made)
        if delay > self._left_s():
            # Waiting would hold the reply past the budget (a per-minute quota asks for tens
            # of seconds): end now and say when, rather than spend more requests of it.
            budget = f"{self.policy.budget_s:g} s"
            why = (
                f"; it asks to wait {delay:g} s, longer than the retry budget ({budget})"
                if asked is not None
                else f"; the next retry would pass the retry budget ({budget})"
            )
            self.gave_up = GaveUp(code or ReplyErrorCode.MODEL_UNAVAILABLE, asked_ms, why)
            return None
        self.waited_s += delay
        return delay
