"""Structured logs: one JSON object per line.

Every line has ``time``, ``level``, ``event``, ``logger`` and ``instance``; fields passed
with ``extra=`` follow (``session``, ``conversation``, ``user`` where they apply). Message
text, model output and credentials are never logged: callers pass ids, and extra fields
named like a secret or a text body are masked here as a safety net.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

from aiohttp.abc import AbstractAccessLogger
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse

_RESERVED = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}
# Extra fields never written as given: what a user typed, what a model said, credentials.
MASKED_FIELDS = frozenset(
    {"text", "content", "delta", "token", "authorization", "password", "secret", "jwt"}
)
# Probes and scrapes: logged at debug, not to drown the access log.
QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


class JsonFormatter(logging.Formatter):
    def __init__(self, instance: str) -> None:
        super().__init__()
        self.instance = instance

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "event": record.getMessage(),
            "logger": record.name,
            "instance": self.instance,
        }
        for key, value in vars(record).items():
            if key not in _RESERVED and not key.startswith("_") and key not in out:
                out[key] = "***" if key.lower() in MASKED_FIELDS else value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str, ensure_ascii=False)


class JsonAccessLogger(AbstractAccessLogger):
    """One structured line per request: the path without its query (tokens may be there)."""

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        level = logging.DEBUG if request.path in QUIET_PATHS else logging.INFO
        if not self.logger.isEnabledFor(level):
            return
        self.logger.log(
            level,
            "%s %s %s",
            request.method,
            request.path,
            response.status,
            extra={
                "method": request.method,
                "path": request.path,
                "status": response.status,
                "duration_ms": round(time * 1000, 2),
                "remote": request.remote,
            },
        )


_formatter = JsonFormatter("")  # replaced by configure(), which knows the instance


def announce(event: str, **fields: Any) -> None:
    """One JSON line on stdout whatever the log level: what whoever starts the server needs."""
    record = logging.LogRecord("chatserver", logging.INFO, __file__, 0, event, None, None)
    record.__dict__.update(fields)
    print(_formatter.format(record), flush=True)


def _log_uncaught(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, exc, tb)
        return
    logging.getLogger("chatserver").critical("uncaught exception", exc_info=(kind, exc, tb))


def configure(level: str, instance: str) -> None:
    global _formatter
    _formatter = JsonFormatter(instance)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # The access log goes through the same handler, as JSON.
    logging.getLogger("aiohttp.access").setLevel(level.upper())
    # A malformed HTTP request (a request line past 8190 bytes, a bad header) is the client's
    # fault, answered 400 by aiohttp, which logs it as an error with a traceback: anyone could
    # fill the error log and page someone. Logged at info, one line, instead.
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, _ClientFaultFilter) for f in server_log.filters):
        server_log.addFilter(_ClientFaultFilter())
    # Python warnings and a crash's traceback become JSON lines too, not raw stderr text.
    logging.captureWarnings(True)
    sys.excepthook = _log_uncaught


class _ClientFaultFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        from aiohttp.http_exceptions import HttpProcessingError

        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError) and 400 <= (exc.code or 0) < 500:
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg = f"{record.msg}: {type(exc).__name__} {exc.code}"
            record.exc_info = record.exc_text = None
        return True
