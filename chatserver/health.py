"""Dependency checks for /api/health and /readyz."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from . import keys

_CHECK_TIMEOUT_S = 2.0


async def _check(probe: Any) -> dict[str, Any]:
    try:
        await asyncio.wait_for(probe, _CHECK_TIMEOUT_S)
    except Exception as exc:
        return {"status": "down", "error": f"{type(exc).__name__}: {exc}"[:200]}
    return {"status": "ok"}


async def _ok() -> None:
    return None


async def _broker_probe(app: web.Application) -> None:
    redis = app[keys.REDIS]
    if redis is not None:
        await redis.ping()
    if not app[keys.BROKER].healthy():
        raise ConnectionError("pub/sub connection down")


async def health_report(app: web.Application, include_ai: bool = True) -> dict[str, Any]:
    store = app[keys.STORE]
    database = await _check(store.ping())
    database["backend"] = store.name
    redis = await _check(_broker_probe(app))
    redis["backend"] = app[keys.BROKER].name
    checks: dict[str, Any] = {"database": database, "redis": redis}
    if include_ai:
        provider = app[keys.GENERATION].provider
        checks["ai"] = {"status": "ok" if provider.healthy() else "down", "backend": provider.name}
    status = "ok" if all(c["status"] == "ok" for c in checks.values()) else "degraded"
    return {"status": status, "checks": checks}
