"""The settings of replies: the local model, queues and attempts, routing, the response
cache, and Gemini."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlparse

from ..agents import is_model_name
from ..limits.model_guard import ModelLimits, ModelLimitTable
from .declare import (
    bad,
    not_negative,
    positive,
    setting,
)


@dataclass(frozen=True, slots=True)
class ReplySettings:
    lease_s: float = setting(
        "reply_lease_s", 5.0, "float", "lease of a running reply; renewed while it streams"
    )
    max_queued: int = setting(
        "max_queued_replies", 4, "int", "replies waiting behind a running one, per conversation"
    )
    max_held: int = setting(
        "max_replies_per_instance",
        256,
        "int",
        "questions one instance answers at once (running and queued); past it sends are refused",
    )
    turn_wait_s: float = setting(
        "reply_turn_wait_s",
        60.0,
        "float",
        "longest a reply waits behind an older one held elsewhere: for its turn (past it, it "
        "runs anyway), then for the conversation's reply slot",
    )
    attempts: int = setting(
        "reply_attempts", 3, "int", "model attempts per reply for retryable errors (before text)"
    )
    early_calls: bool = setting(
        "early_model_calls",
        True,
        "bool",
        "production: a question's model call starts beside its append where this instance "
        "holds the context, instead of after it (one Redis round trip less to the first "
        "token; a call whose prompt turned out otherwise is cancelled)",
    )
    crash_after_append: bool = setting(
        "test_crash_after_append",
        False,
        "bool",
        "tests only: exit at once after the first append (with Redis, the append fanned it "
        "out; in memory, nothing did), before its reply starts",
        flag=False,
    )
    local_ttft_ms: int = setting("local_ttft_ms", 150, "int", "local model: time to first token")
    local_token_ms: int = setting("local_token_ms", 15, "int", "local model: time per word")
    light_max_chars: int = setting(
        "light_max_chars",
        200,
        "int",
        "routing: a first turn this short goes to the agent's light_model (0: off)",
    )
    cache_ttl_s: int = setting(
        "response_cache_ttl_s",
        3600,
        "int",
        "cacheable agents: first-turn answers kept this long (0: off)",
    )
    cache_entries: int = setting(
        "response_cache_entries", 10_000, "int", "memory response cache: most answers kept (LRU)"
    )
    cache_bytes: int = setting(
        "response_cache_bytes",
        32 * 1024 * 1024,
        "int",
        "memory response cache: most bytes of answers kept (LRU)",
    )

    def __post_init__(self) -> None:
        positive(
            self,
            "lease_s",
            "max_queued",
            "cache_entries",
            "cache_bytes",
            "max_held",
            "attempts",
            "turn_wait_s",
        )
        not_negative(self, "local_ttft_ms", "local_token_ms", "light_max_chars", "cache_ttl_s")


# With a key, replies come from Gemini (else from the local model).
@dataclass(frozen=True, slots=True)
class GeminiSettings:
    api_key: str | None = setting(
        "gemini_api_key",
        None,
        "optional_str",
        "Gemini API key (else GEMINI_API_KEY / GOOGLE_API_KEY); unset: the local model",
        flag=False,
        secret=True,
    )
    base_url: str | None = setting(
        "gemini_base_url",
        None,
        "optional_str",
        "Gemini API base URL (a proxy, a test fake); unset: Google's",
    )
    transport: str = setting(
        "gemini_transport",
        "sse",
        "str",
        "'sse': lean aiohttp SSE streaming; 'sdk': the google-genai SDK",
    )
    timeout_s: float = setting(
        "gemini_timeout_s",
        30.0,
        "float",
        "Gemini: longest wait for the first chunk or the next one",
    )
    retries: int = setting(
        "gemini_retries",
        3,
        "int",
        "Gemini: retries of a 429/5xx answer, an error event or a failed connection before "
        "the first chunk",
    )
    retry_initial_s: float = setting(
        "gemini_retry_initial_s", 0.5, "float", "Gemini: first retry delay (doubles, plus jitter)"
    )
    retry_max_s: float = setting("gemini_retry_max_s", 8.0, "float", "Gemini: longest retry delay")
    retry_budget_s: float = setting(
        "gemini_retry_budget_s",
        10.0,
        "float",
        "Gemini: longest a reply waits in all between its requests (backoff, RetryInfo, the "
        "model guard); a longer wait asked for ends the reply at once (model_rate_limited)",
    )
    thinking_timeout_s: float = setting(
        "gemini_thinking_timeout_s",
        120.0,
        "float",
        "Gemini: longest wait for the first chunk of a reply whose model may think",
    )
    max_concurrent: int = setting(
        "gemini_max_concurrent",
        100,
        "int",
        "Gemini: requests in flight at once per model, across instances (0: no cap)",
    )
    requests_per_minute: int = setting(
        "gemini_requests_per_minute",
        0,
        "int",
        "Gemini: requests started per minute per model, across instances (0: no cap)",
    )
    model_limits: str = setting(
        "gemini_model_limits",
        "",
        "str",
        "Gemini: per-model caps, MODEL=CONCURRENT/PER_MINUTE,... (else the two above)",
    )
    probe_model: str = setting(
        "gemini_probe_model",
        "gemini-2.5-flash-lite",
        "str",
        "model the AI health check looks up",
    )
    check_ttl_s: float = setting(
        "ai_check_ttl_s",
        30.0,
        "float",
        "the AI health check calls the model API at most this often",
    )

    def __post_init__(self) -> None:
        if self.transport not in {"sse", "sdk"}:
            raise bad(self, "transport", "sse|sdk")
        if self.base_url is not None and urlparse(self.base_url).scheme not in {"http", "https"}:
            raise bad(self, "base_url", "not an http(s) URL")
        positive(
            self,
            "timeout_s",
            "retry_initial_s",
            "retry_max_s",
            "check_ttl_s",
            "thinking_timeout_s",
        )
        not_negative(self, "retry_budget_s", "max_concurrent", "requests_per_minute")
        if not 0 <= self.retries <= 10:
            raise bad(self, "retries", "must be 0..10")
        if not is_model_name(self.probe_model):
            raise bad(self, "probe_model", "a model id, or models/<id>, tunedModels/<id>")
        try:
            self.model_table()
        except ValueError as exc:
            raise bad(self, "model_limits", str(exc)) from None

    def model_table(self) -> ModelLimitTable:
        """The model guard's caps: the per-model ones, else the defaults."""
        default = ModelLimits(self.max_concurrent, self.requests_per_minute)
        return ModelLimitTable.parse(self.model_limits, default)
