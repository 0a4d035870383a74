"""Dependency checks for /api/health and /readyz.

Each check answers ``{"status": "ok"|"down", "backend": ...}`` (plus ``error`` when down).
The checks run concurrently, each bounded by ``CHECK_TIMEOUT_S``, so a dead dependency
answers "down" within that time instead of hanging the probe.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

from aiohttp import web

from .. import keys

CHECK_TIMEOUT_S = 2.0


async def _check(probe: Awaitable[object]) -> dict[str, Any]:
    try:
        await asyncio.wait_for(probe, CHECK_TIMEOUT_S)
    except TimeoutError:
        result: dict[str, Any] = {
            "status": "down",
            "error": f"no answer within {CHECK_TIMEOUT_S:g} s",
        }
    except Exception as exc:
        result = {"status": "down", "error": f"{type(exc).__name__}: {exc}"[:200]}
    else:
        result = {"status": "ok"}
    return result


async def _broker_probe(app: web.Application) -> None:
    redis = app[keys.REDIS]
    if redis is not None:
        await redis.ping()
    if not app[keys.BROKER].healthy():
        raise ConnectionError("pub/sub connection down")


async def health_report(app: web.Application, include_ai: bool = True) -> dict[str, Any]:
    """``{"status": "ok"|"degraded", "checks": {"database": ..., "redis": ..., "ai": ...}}``.

    ``redis`` is the fan-out broker: Redis when configured, else the in-process one (always
    up). ``ai`` is the reply provider's own view of its upstream; readiness leaves it out
    (an instance without a model still serves history and fan-out).
    """
    store = app[keys.STORE]
    database, redis = await asyncio.gather(_check(store.ping()), _check(_broker_probe(app)))
    database["backend"] = store.name
    redis["backend"] = app[keys.BROKER].name
    checks: dict[str, Any] = {"database": database, "redis": redis}
    if include_ai:
        provider = app[keys.GENERATION].provider
        probe = provider.probe  # a cheap upstream call, cached (Gemini)
        if probe is not None:
            ai = await _check(probe())
        else:
            ai = {"status": "ok" if provider.healthy() else "down"}
        checks["ai"] = {**ai, "backend": provider.name}
    status = "ok" if all(c["status"] == "ok" for c in checks.values()) else "degraded"
    return {"status": status, "checks": checks}
