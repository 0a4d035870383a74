"""Error codes and WebSocket close codes of wire protocol v1."""

from __future__ import annotations

from enum import IntEnum, StrEnum


class ErrorCode(StrEnum):
    BAD_FRAME = "bad_frame"
    UNKNOWN_TYPE = "unknown_type"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    RATE_LIMITED = "rate_limited"
    QUOTA_EXCEEDED = "quota_exceeded"
    TOO_LARGE = "too_large"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"
    # REST only: a request body or query parameter that does not validate.
    BAD_REQUEST = "bad_request"


class CloseCode(IntEnum):
    NORMAL = 1000
    GOING_AWAY = 1001
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    TRY_AGAIN_LATER = 1013
    UNAUTHORIZED = 4401
    FORBIDDEN = 4403
    SLOW_CONSUMER = 4408
    TOO_MANY_CONNECTIONS = 4429


class FinishReason(StrEnum):
    STOP = "stop"
    LENGTH = "length"
    CANCELLED = "cancelled"
    SAFETY = "safety"
    ERROR = "error"


class ReplyErrorCode(StrEnum):
    """``gen_end.error_code``: why a reply ended with ``error``, for a client to show.

    Sent only where the server knows the kind; a client treats a code it does not know (a
    later version may add some) as a plain error.
    """

    # The model's rate limit or quota (HTTP 429), or this service's own cap on requests to
    # the model; ``retry_after_ms`` says when asking again may succeed, when known.
    MODEL_RATE_LIMITED = "model_rate_limited"
    # The model failed (5xx), could not be reached, cut the stream or stalled past the wait.
    MODEL_UNAVAILABLE = "model_unavailable"
    # The model refused the request (4xx other than 408 and 429: key, model name, argument).
    MODEL_REJECTED = "model_rejected"


class Role(StrEnum):
    USER = "user"
    ASSISTANT = "assistant"
    SYSTEM = "system"


class Tier(StrEnum):
    FREE = "free"
    PRO = "pro"
    ENTERPRISE = "enterprise"


class UserRole(StrEnum):
    USER = "user"
    ADMIN = "admin"


PROTOCOL_VERSION = 1
