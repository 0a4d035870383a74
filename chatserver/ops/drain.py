"""Graceful drain: what an instance does between SIGTERM and exit."""

from __future__ import annotations

import logging

from aiohttp import web

from .. import keys
from ..ws.going_away import drain_connections

log = logging.getLogger("chatserver.drain")


async def drain(app: web.Application) -> None:
    """Refuse new work, finish or hand over replies, send every client elsewhere.

    ``/readyz`` answers 503 from the first line on, so a load balancer stops routing here,
    and new WebSocket upgrades are refused. With Redis, clients are moved at once: they
    rejoin on another instance and follow the replies still streaming here through the
    broker and the shared resume buffer. Alone, the instance first lets its replies finish
    (up to the grace period; the rest end with `error`, partial text kept), then sends the
    clients off. Idempotent: the second call (aiohttp's on_shutdown) does nothing.
    """
    state = app[keys.STATE]
    if state.draining:
        return
    state.draining = True
    settings = app[keys.SETTINGS]
    generation = app[keys.GENERATION]
    log.info("draining", extra={"replies": generation.running})
    if app[keys.REDIS] is not None:
        drain_connections(app, settings.server.drain_jitter_ms)
        await generation.shutdown(settings.server.shutdown_grace_s)
    else:
        await generation.shutdown(settings.server.shutdown_grace_s)
        drain_connections(app, settings.server.drain_jitter_ms)
    log.info("drained")
