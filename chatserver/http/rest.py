"""REST routes of the contract, health and readiness, metrics and the browser client."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from importlib import resources
from pathlib import Path
from typing import Any

from aiohttp import web

from protocol import ErrorCode, text_problem

from .. import keys
from ..auth import AuthError, Principal, bearer_token, check_claims
from ..errors import ServiceError, is_dependency_failure
from ..fanout.events import MEMBER_REMOVED
from ..fanout.publish import publish
from .health import health_report

log = logging.getLogger("chatserver.rest")
STATIC_DIR = Path(str(resources.files("chatserver").joinpath("static")))
AGENTS_CACHE = "public, s-maxage=60, stale-while-revalidate=120"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# The status recorded for a request whose client went away first (nginx's convention): not a
# 5xx, so no client can raise the error-rate alert by hanging up.
CLIENT_CLOSED = 499
# The methods a metric label shows; any other the parser takes (WebDAV's and the like, some
# forty) counts as "other": a label value per method is a series, and a child in memory.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def error_response(
    code: ErrorCode, message: str, status: int | None = None, retry_after_ms: int | None = None
) -> web.Response:
    status = status or ServiceError(code, message).http_status
    error: dict[str, Any] = {"code": code.value, "message": message}
    headers = {}
    if retry_after_ms is not None:
        error["retry_after_ms"] = retry_after_ms
        headers["Retry-After"] = str(max(1, -(-retry_after_ms // 1000)))  # whole seconds, up
    return web.json_response({"error": error}, status=status, headers=headers)


@web.middleware
async def errors_and_metrics(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except ServiceError as exc:
        status = exc.http_status
        if exc.code in (ErrorCode.RATE_LIMITED, ErrorCode.QUOTA_EXCEEDED):
            request.app[keys.METRICS].rate_limited.labels(exc.code.value).inc()
        return error_response(exc.code, exc.message, status, exc.retry_after_ms)
    except web.HTTPException as exc:
        status = exc.status
        if exc.status >= 400 and request.path.startswith("/api/"):
            code = ErrorCode.NOT_FOUND if exc.status == 404 else ErrorCode.BAD_REQUEST
            if exc.status == 413:
                code = ErrorCode.TOO_LARGE
            return error_response(code, exc.reason, exc.status)
        raise
    except ClientGone as exc:
        log.info("client gone: %s", exc, extra={"path": request.path})
        status = CLIENT_CLOSED
        return error_response(ErrorCode.BAD_REQUEST, str(exc), 400)  # nobody reads it
    except asyncio.CancelledError:
        # aiohttp cancels the handler of a client that hung up: not a server error either.
        status = CLIENT_CLOSED
        raise
    except Exception as exc:
        if is_dependency_failure(exc):
            log.warning("dependency unavailable: %s", exc, extra={"path": request.path})
            status = 503
            return error_response(ErrorCode.UNAVAILABLE, "temporarily unavailable, retry", 503)
        log.exception("request failed", extra={"path": request.path})
        return error_response(ErrorCode.INTERNAL, "internal error", 500)
    finally:
        route = request.match_info.route.resource
        name = route.canonical if route is not None else "unmatched"
        if name != "/ws":
            method = request.method if request.method in _METHODS else "other"
            metrics = request.app[keys.METRICS]
            metrics.child(metrics.http_duration, name, method, str(status)).observe(
                time.perf_counter() - started
            )


def require_principal(request: web.Request) -> Principal:
    token = bearer_token(request.headers.get("Authorization"))
    if token is None:
        raise ServiceError(ErrorCode.UNAUTHORIZED, "missing Authorization: Bearer token")
    try:
        return request.app[keys.AUTH].verify(token)
    except AuthError as exc:
        raise ServiceError(ErrorCode.UNAUTHORIZED, str(exc)) from None


async def authorized(request: web.Request) -> Principal:
    """The caller, authenticated and within its tier's REST rate (shared by every instance
    through Redis in production)."""
    principal = require_principal(request)
    per_minute = request.app[keys.SETTINGS].tier_limits(principal.tier).requests_per_minute
    await _take(request.app, principal, "rest", per_minute, "requests")
    return principal


async def _take(
    app: web.Application, principal: Principal, kind: str, per_minute: int, what: str
) -> None:
    """One from the user's bucket of ``kind``, or ``rate_limited`` saying when to try again."""
    refusal = await app[keys.LIMITER].take(principal.user_id, kind, per_minute)
    if refusal is not None:
        raise ServiceError(
            refusal.code,
            f"at most {per_minute} {what} per minute",
            retry_after_ms=refusal.retry_after_ms,
        )


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        # A body that stalls holds a handler (and aiohttp's idle timer waits meanwhile).
        async with asyncio.timeout(request.app[keys.SETTINGS].server.http_idle_timeout_s):
            raw = await request.read()
    except ConnectionError:
        # The client went away mid-upload: its doing, not a dependency's (no 503, no alert).
        raise ClientGone("the request body was cut off") from None
    except TimeoutError:
        raise ServiceError(
            ErrorCode.BAD_REQUEST, "the request body did not arrive in time"
        ) from None
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested past the stack
        raise ServiceError(ErrorCode.BAD_REQUEST, "body must be a JSON object") from None
    if not isinstance(body, dict):
        raise ServiceError(ErrorCode.BAD_REQUEST, "body must be a JSON object")
    return body


class ClientGone(Exception):
    """The client closed its connection before its request was read: nobody to answer."""


def _line(value: object, name: str, max_chars: int = 64, *, empty: bool = False) -> str:
    """A single-line text field of a request body (an id, a title), or a 400 naming it."""
    if not isinstance(value, str) or (not value and not empty):
        raise ServiceError(ErrorCode.BAD_REQUEST, f"'{name}' must be a non-empty string")
    if len(value) > max_chars:
        raise ServiceError(ErrorCode.BAD_REQUEST, f"'{name}' is longer than {max_chars} characters")
    problem = text_problem(value)
    if problem is not None:
        raise ServiceError(ErrorCode.BAD_REQUEST, f"'{name}' holds {problem}")
    return value


def _int_query(
    request: web.Request, name: str, default: int | None, lo: int, hi: int
) -> int | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ServiceError(ErrorCode.BAD_REQUEST, f"'{name}' must be an integer") from None
    if not lo <= value <= hi:
        raise ServiceError(ErrorCode.BAD_REQUEST, f"'{name}' must be within {lo}..{hi}")
    return value


def _uuid_or_404(text: str) -> str:
    try:
        value = uuid.UUID(text)
    except ValueError:
        raise ServiceError(ErrorCode.NOT_FOUND, "no such conversation") from None
    return str(value)


async def list_agents(request: web.Request) -> web.Response:
    await authorized(request)
    items = [a.public_dict() for a in request.app[keys.AGENTS].public()]
    return web.json_response({"items": items}, headers={"Cache-Control": AGENTS_CACHE})


async def create_conversation(request: web.Request) -> web.Response:
    principal = await authorized(request)
    body = await _json_body(request)
    agent_id = body.get("agent_id")
    title = body.get("title")
    members = body.get("members", [])
    limits = request.app[keys.LIMITS]
    agent_id = _line(agent_id, "agent_id")
    if title is not None:
        if not isinstance(title, str):
            raise ServiceError(ErrorCode.BAD_REQUEST, "'title' must be a string")
        title = _line(title, "title", limits.max_title_chars, empty=True)
    if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
        raise ServiceError(ErrorCode.BAD_REQUEST, "'members' must be an array of user ids")
    if len(members) > limits.max_members:
        raise ServiceError(ErrorCode.BAD_REQUEST, f"more than {limits.max_members} members")
    members = [_line(m, "members[]") for m in members]
    await _admit_creation(request.app, principal)
    conversation = await request.app[keys.CONVERSATIONS].create(principal, agent_id, title, members)
    request.app[keys.METRICS].conversations_created.inc()
    log.info(
        "conversation created",
        extra={
            "user": principal.user_id,
            "conversation": conversation.id,
            "agent": conversation.agent_id,
            "members": len(conversation.members),
        },
    )
    return web.json_response(conversation.to_dict(), status=201)


async def _admit_creation(app: web.Application, principal: Principal) -> None:
    """The tier's creations per minute, then its cap on conversations owned at once: one user
    cannot fill the store, nor (through invented members) everybody's lists."""
    limits = app[keys.SETTINGS].tier_limits(principal.tier)
    await _take(app, principal, "create", limits.conversations_per_minute, "new conversations")
    if await app[keys.STORE].count_owned_conversations(principal.user_id) >= limits.conversations:
        raise ServiceError(
            ErrorCode.QUOTA_EXCEEDED, f"at most {limits.conversations} conversations per user"
        )


async def list_conversations(request: web.Request) -> web.Response:
    principal = await authorized(request)
    limit = _int_query(request, "limit", 20, 1, 100)
    assert limit is not None
    cursor = request.query.get("cursor") or None
    try:
        page = await request.app[keys.STORE].list_conversations(principal.user_id, cursor, limit)
    except ValueError:
        raise ServiceError(ErrorCode.BAD_REQUEST, "invalid cursor") from None
    return web.json_response(
        {
            "items": [c.to_dict() for c in page.items],
            "next_cursor": page.next_cursor,
            "has_more": page.has_more,
        }
    )


async def leave_conversation(request: web.Request) -> web.Response:
    """The caller stops being a member: its connections to the conversation get `left`, on
    every instance, and it can neither join nor read it any more."""
    principal = await authorized(request)
    conversation_id = _uuid_or_404(request.match_info["conversation_id"])
    await request.app[keys.CONVERSATIONS].leave(conversation_id, principal.user_id)
    removed = {"type": MEMBER_REMOVED, "conversation_id": conversation_id}
    await publish(request.app, conversation_id, {**removed, "user_id": principal.user_id})
    log.info("member left", extra={"user": principal.user_id, "conversation": conversation_id})
    return web.Response(status=204)


async def list_messages(request: web.Request) -> web.Response:
    principal = await authorized(request)
    conversation_id = _uuid_or_404(request.match_info["conversation_id"])
    limits = request.app[keys.LIMITS]
    limit = _int_query(request, "limit", limits.history_default_limit, 1, limits.history_max_limit)
    before = _int_query(request, "before", None, 1, 2**62)
    assert limit is not None
    conversations = request.app[keys.CONVERSATIONS]
    await conversations.require_member(conversation_id, principal.user_id)
    page = await conversations.history(conversation_id, before, limit)
    return web.json_response(
        {"items": [m.to_dict() for m in page.messages], "has_more": page.has_more}
    )


async def dev_token(request: web.Request) -> web.Response:
    auth = request.app[keys.AUTH]
    if not auth.dev_mode:
        raise web.HTTPNotFound()
    body = await _json_body(request)
    user_id = body.get("user_id")
    tier = body.get("tier", "free")
    if not isinstance(user_id, str) or not isinstance(tier, str):
        raise ServiceError(ErrorCode.BAD_REQUEST, "'user_id' and 'tier' must be strings")
    user_id = _line(user_id, "user_id")
    try:
        check_claims(user_id, tier, "user")
    except AuthError as exc:
        raise ServiceError(ErrorCode.BAD_REQUEST, str(exc)) from None
    return web.json_response({"token": auth.issue(user_id, tier, "user", ttl_s=24 * 3600)})


async def health(request: web.Request) -> web.Response:
    report = await health_report(request.app)
    return web.json_response(report, status=200 if report["status"] == "ok" else 503)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    if request.app[keys.STATE].draining:
        return web.json_response({"status": "draining"}, status=503)
    report = await health_report(request.app, include_ai=False)
    return web.json_response(report, status=200 if report["status"] == "ok" else 503)


async def metrics(request: web.Request) -> web.Response:
    body = request.app[keys.METRICS].exposition()
    return web.Response(
        body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}
    )


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/api/agents", list_agents)
    app.router.add_post("/api/conversations", create_conversation)
    app.router.add_get("/api/conversations", list_conversations)
    app.router.add_get("/api/conversations/{conversation_id}/messages", list_messages)
    app.router.add_delete("/api/conversations/{conversation_id}/members/me", leave_conversation)
    app.router.add_post("/api/dev/token", dev_token)
    app.router.add_get("/api/health", health)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/", index)
    app.router.add_static("/static/", STATIC_DIR, name="static")
