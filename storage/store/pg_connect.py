"""Connecting to Postgres, and which of its failures a retry may cure (``StoreUnavailable``)."""

from __future__ import annotations

from typing import Any

import asyncpg  # type: ignore[import-untyped]

from .base import StoreUnavailable

# SQLSTATE classes that mean "not now" rather than "never": connection exception, transaction
# rollback (deadlock, serialization, recovery conflict on a replica), insufficient resources,
# operator intervention (shutdown, starting up), system error. Plus read-only transaction
# (a primary that was demoted) and lock not available.
_TRANSIENT_CLASSES = frozenset({"08", "40", "53", "57", "58"})
_TRANSIENT_STATES = frozenset({"25006", "55P03"})


def is_unavailable(exc: BaseException) -> bool:
    """True for failures a retry may cure: the server or the network, not the request."""
    if isinstance(exc, OSError | TimeoutError | asyncpg.InterfaceError):
        return True
    if isinstance(exc, asyncpg.PostgresError):
        state = str(getattr(exc, "sqlstate", "") or "")
        return state[:2] in _TRANSIENT_CLASSES or state in _TRANSIENT_STATES
    return False


def pool_options(min_size: int, max_size: int, timeout_s: float, pgbouncer: bool) -> dict[str, Any]:
    server_settings = {"application_name": "chatserver"}
    if not pgbouncer:
        # PgBouncer refuses unknown startup parameters; there, writes SET LOCAL them instead.
        server_settings["jit"] = "off"  # JIT compiles cost more than these queries
        # A cached generic plan of the batch insert (planned for a 10-row guess of its
        # arrays) turns a 1,000-row batch into seconds of nested loops (pg_write). These
        # statements plan in tens of microseconds: every one gets a custom plan.
        server_settings["plan_cache_mode"] = "force_custom_plan"
    return {
        "min_size": min_size,
        "max_size": max_size,
        "command_timeout": timeout_s,
        "timeout": timeout_s,  # connecting
        "statement_cache_size": 0 if pgbouncer else 100,
        "server_settings": server_settings,
        "reset": release_reset,
    }


async def release_reset(conn: Any) -> None:
    """What a connection needs before it goes back to the pool: only a transaction left
    open (an operation that failed inside one) rolled back.

    asyncpg's own reset sends ``pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL``
    on every release: a round trip per operation, for session state this package never
    makes (settings are startup parameters or ``SET LOCAL``, advisory locks
    transaction-level, no LISTEN or cursors outside a transaction: what PgBouncer's
    transaction mode needs anyway).
    """
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


async def create_pool(dsn: str, options: dict[str, Any]) -> Any:
    try:
        return await asyncpg.create_pool(dsn, **options)
    except Exception as exc:
        if is_unavailable(exc):
            raise StoreUnavailable(f"cannot connect to Postgres: {exc!r}") from exc
        raise
