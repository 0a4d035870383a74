"""Which Postgres failures a retry may cure (``StoreUnavailable``) and which it may not."""

from __future__ import annotations

import asyncpg  # type: ignore[import-untyped]

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
