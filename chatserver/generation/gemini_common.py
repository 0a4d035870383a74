"""What both Gemini paths share (the SDK's, ``gemini.py``, and the lean SSE one,
``gemini_sse.py``): configuration, model names, when a model thinks, the request body, the
cached health probe and the HTTP session. The answer's mapping to a ``Finish`` is in
``gemini_answer.py``, the retries in ``gemini_retry.py``. Both paths must behave the same
against the same fake server.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from protocol import Role

from .gemini_retry import RetryPolicy
from .provider import ReplyRequest

__all__ = ["RetryPolicy"]  # re-exported: configured with the rest

API_VERSION = "v1beta"
DEFAULT_BASE_URL = "https://generativelanguage.googleapis.com"
MAX_CONNECTIONS = 2000  # upstream connections per instance: one per running reply
PROBE_TIMEOUT_S = 2.0


@dataclass(frozen=True, slots=True)
class GeminiConfig:
    api_key: str
    base_url: str | None = None  # None: Google's endpoint
    timeout_s: float = 30.0  # no data for this long: the reply ends with error
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    probe_model: str = "gemini-2.5-flash-lite"
    probe_ttl_s: float = 30.0
    # The first chunk of a reply that may think: thinking streams nothing (its thoughts are
    # not asked for), and 2.5 Pro may think for a minute or more.
    thinking_timeout_s: float = 120.0

    @property
    def url(self) -> str:
        return (self.base_url or DEFAULT_BASE_URL).rstrip("/")

    def first_wait_s(self, thinking: bool) -> float:
        """How long the first chunk may take."""
        return max(self.timeout_s, self.thinking_timeout_s) if thinking else self.timeout_s


# -- models --------------------------------------------------------------------------------


def model_path(model: str) -> str:
    """The model's resource name, as REST paths take it: Google's reference and
    ``models.list`` write ``models/gemini-2.5-flash``, agents often the bare id; tuned
    models are ``tunedModels/<id>``. The SDK does the same (``t_model``)."""
    if model.startswith(("models/", "tunedModels/")):
        return model
    return f"models/{model}"


def may_think(model: str, thinking_budget: int | None) -> bool:
    """Whether a reply may think before its first chunk. A budget says it; without one the
    model's default decides: Gemini 2.5 Flash and Pro (and later) think unless asked not
    to, the Flash-Lite models and the 1.x and 2.0 ones do not."""
    if thinking_budget is not None:
        return thinking_budget != 0
    name = model.rsplit("/", 1)[-1]
    return not ("-lite" in name or name.startswith(("gemini-1", "gemini-2.0")))


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
    config: dict[str, Any] = {
        "temperature": request.temperature,
        "maxOutputTokens": request.max_output_tokens,
    }
    if request.thinking_budget is not None:
        # Without a budget nothing is sent: a model that cannot think refuses the field.
        config["thinkingConfig"] = {
            "includeThoughts": False,
            "thinkingBudget": request.thinking_budget,
        }
    body["generationConfig"] = config
    return body


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
    """The upstream HTTP client: one pool per instance, a large read buffer for long SSE
    lines. The standard proxy variables are honoured (``HTTPS_PROXY``, ``HTTP_PROXY``,
    ``NO_PROXY``: ``trust_env``), as google-genai would on its own, and the certificates
    are verified against the system's, or ``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` when set
    (a proxy that inspects TLS signs with its own CA). The context is made here, not
    aiohttp's made at import: the variables are read when the provider starts."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(
            limit=MAX_CONNECTIONS, limit_per_host=0, ssl=ssl.create_default_context()
        ),
        timeout=timeout or aiohttp.ClientTimeout(total=None),
        read_bufsize=1 << 20,
        trust_env=True,
    )
