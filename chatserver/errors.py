"""Errors the use-cases raise; the gateway and REST layer map them to the contract."""

from __future__ import annotations

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from protocol import ErrorCode
from storage.outbox.base import OutboxFull
from storage.store.base import StoreUnavailable

from .fanout.broker.base import BrokerUnavailable

# Failures of Redis or the store that a retry may cure: answered `unavailable`, not `internal`.
DEPENDENCY_ERRORS: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    StoreUnavailable,
    BrokerUnavailable,
    OutboxFull,
    ConnectionError,
    TimeoutError,
)


def is_dependency_failure(exc: BaseException) -> bool:
    """A failure of Redis or the store that a retry may cure (``DEPENDENCY_ERRORS``), or a
    write on a connection uvloop has closed: it raises ``RuntimeError`` ("the handler is
    closed"), not a ``ConnectionError``, and redis-py's cluster client lets it through
    when a node restarts."""
    if isinstance(exc, DEPENDENCY_ERRORS):
        return True
    return isinstance(exc, RuntimeError) and "handler is closed" in str(exc)


HTTP_STATUS = {
    ErrorCode.BAD_FRAME: 400,
    ErrorCode.BAD_REQUEST: 400,
    ErrorCode.UNKNOWN_TYPE: 400,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.TOO_LARGE: 413,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.QUOTA_EXCEEDED: 429,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.INTERNAL: 500,
}


class ServiceError(Exception):
    # retry_after_ms is keyword-only: ``ServiceError(code, "...", 500)`` would read as HTTP 500.
    def __init__(self, code: ErrorCode, message: str, *, retry_after_ms: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_ms = retry_after_ms

    @property
    def http_status(self) -> int:
        return HTTP_STATUS.get(self.code, 500)
