"""Admin routes (role ``admin`` only): what this instance holds, and what its memory holds.

``GET /api/admin/stats``: connections, conversations, replies, the outbox backlog.
``GET /api/admin/memory``: resident size, the Python heap, garbage collection and the fill of
every bounded structure; cheap, a sampler may read it every few seconds.
``POST /api/admin/memory/sites``: take the baseline of allocation sites (a ``tracemalloc``
snapshot grouped by site); ``GET /api/admin/memory/sites?top=N``: the N sites (at most 100)
whose live bytes grew most since. Both need ``CHAT_TRACEMALLOC_FRAMES`` (else 400
``bad_request``: the instance's setting, not an outage) and hold the event loop while the
snapshot is taken (about a second per million live blocks): for an operator or a
benchmark, not for a probe.
``POST /api/admin/memory/collect?top=N``: a full garbage collection now, and what the cyclic
garbage it freed was made of (the N most found types).
"""

from __future__ import annotations

from aiohttp import web

from protocol import ErrorCode

from .. import keys
from ..auth import Principal
from ..errors import ServiceError
from ..ops.memory import MAX_TOP
from .rest import _int_query, authorized


async def _admin(request: web.Request) -> Principal:
    principal = await authorized(request)
    if principal.role != "admin":
        raise ServiceError(ErrorCode.FORBIDDEN, "admin role required")
    return principal


async def admin_stats(request: web.Request) -> web.Response:
    """What this instance holds right now."""
    await _admin(request)
    app = request.app
    state = app[keys.STATE]
    return web.json_response(
        {
            "server_id": app[keys.SETTINGS].server.server_id,
            "draining": state.draining,
            "connections": len(state.connections),
            "users": len(state.users),
            "conversations": app[keys.HUB].conversations(),
            "replies": app[keys.GENERATION].running,
            "replies_pending": app[keys.GENERATION].pending,
            "outbox_backlog": await app[keys.OUTBOX].backlog(),
        }
    )


async def admin_memory(request: web.Request) -> web.Response:
    await _admin(request)
    app = request.app
    body = app[keys.HEAP].stats()
    body["server_id"] = app[keys.SETTINGS].server.server_id
    body["bounded"] = {
        name: {"entries": entries, "bound": bound}
        for name, (entries, bound) in sorted(app[keys.BOUNDED].fill().items())
    }
    return web.json_response(body)


def _tracing(app: web.Application) -> None:
    if not app[keys.HEAP].tracing:
        raise ServiceError(
            ErrorCode.BAD_REQUEST,
            "allocation tracing is off: start the instance with CHAT_TRACEMALLOC_FRAMES",
        )


async def mark_sites(request: web.Request) -> web.Response:
    await _admin(request)
    _tracing(request.app)
    return web.json_response(request.app[keys.HEAP].mark())


async def grown_sites(request: web.Request) -> web.Response:
    await _admin(request)
    _tracing(request.app)
    top = _int_query(request, "top", 20, 1, MAX_TOP)
    assert top is not None
    return web.json_response(request.app[keys.HEAP].growth(top))


async def collect(request: web.Request) -> web.Response:
    """A full garbage collection now (a pause: milliseconds per 100,000 live objects);
    ``?top=N``: the N types most found in the cyclic garbage it freed."""
    await _admin(request)
    top = _int_query(request, "top", 0, 0, MAX_TOP)
    return web.json_response(request.app[keys.HEAP].collect(top or 0))


def add_admin_routes(app: web.Application) -> None:
    app.router.add_get("/api/admin/stats", admin_stats)
    app.router.add_get("/api/admin/memory", admin_memory)
    app.router.add_post("/api/admin/memory/sites", mark_sites)
    app.router.add_get("/api/admin/memory/sites", grown_sites)
    app.router.add_post("/api/admin/memory/collect", collect)
