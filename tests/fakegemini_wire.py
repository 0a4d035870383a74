"""What the fake Gemini writes: Google's error bodies, the SSE events, the token counts."""

from __future__ import annotations

import json
from typing import Any

STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


def error_body(code: int, message: str, retry_delay: str | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {
        "code": code,
        "message": message,
        "status": STATUS_NAMES.get(code, ""),
    }
    if retry_delay is not None:  # as Google answers a per-minute quota
        error["details"] = [
            {
                "@type": "type.googleapis.com/google.rpc.QuotaFailure",
                "violations": [{"quotaMetric": "generate_content_free_tier_requests"}],
            },
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": retry_delay},
        ]
    return {"error": error}


def count(text: str) -> int:
    return max(1, len(text.split()))


def prompt_tokens(body: dict[str, Any]) -> int:
    words = 0
    for content in body.get("contents", []):
        for part in content.get("parts", []):
            words += count(part.get("text", ""))
    for part in (body.get("systemInstruction") or {}).get("parts", []):
        words += count(part.get("text", ""))
    return words


def thinking_spent(wanted: int, config: Any) -> int:
    """The thinking tokens a stream spends: what it wants, within ``thinkingBudget``
    (google-genai writes it ``thinking_budget``: proto JSON takes both names, as Google
    does)."""
    budget = None
    if isinstance(config, dict):
        budget = config.get("thinkingBudget", config.get("thinking_budget"))
    if isinstance(budget, int) and budget >= 0:
        return min(wanted, budget)
    return wanted  # no budget, or -1: the model decides


def echo_chunks(body: dict[str, Any]) -> list[str]:
    """A predictable answer: "You said: <the last user text>", one word per chunk."""
    said = ""
    for content in body.get("contents", []):
        if content.get("role") == "user":
            said = " ".join(p.get("text", "") for p in content.get("parts", []))
    words = f"You said: {said}".split()
    return [w if i == len(words) - 1 else w + " " for i, w in enumerate(words)]


def sse_event(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\r\n\r\n"
