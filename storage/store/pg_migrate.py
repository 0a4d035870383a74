"""Versioned SQL migrations of the Postgres store.

Migrations are the files ``storage/migrations/NNNN_name.sql``, applied in version order, each
in its own transaction together with its row in ``schema_migrations``. Many instances may start
at once: each migration transaction first takes a transaction-level advisory lock
(``pg_advisory_xact_lock``) and re-checks the version under it, so exactly one of them applies
each migration and the others wait, then skip it. The transaction-level lock (rather than a
session-level ``pg_advisory_lock``) is what keeps this correct behind PgBouncer in transaction
mode, where a session lock could be taken on one server connection and released on another.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

log = logging.getLogger("storage.store.postgres")

# Arbitrary but fixed: 'chat' in ASCII, then the lock's number.
MIGRATION_LOCK = 0x63686174_0001

_FILE = re.compile(r"(\d{4})_([a-z0-9_]+)\.sql")

_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version integer PRIMARY KEY,
    name text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


class SchemaError(RuntimeError):
    """The database schema does not match what this server needs (and it may not migrate)."""


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def load_migrations() -> list[Migration]:
    """The migrations shipped in ``storage/migrations``, oldest first."""
    out: list[Migration] = []
    for entry in resources.files("storage").joinpath("migrations").iterdir():
        found = _FILE.fullmatch(entry.name)
        if found is None:
            continue
        out.append(Migration(int(found.group(1)), found.group(2), entry.read_text("utf-8")))
    out.sort(key=lambda m: m.version)
    versions = [m.version for m in out]
    if len(set(versions)) != len(versions):
        raise SchemaError(f"two migration files share a version: {versions}")
    return out


async def applied_versions(conn: Any) -> set[int]:
    """Versions recorded in ``schema_migrations`` (empty when the table does not exist)."""
    exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    if not exists:
        return set()
    rows = await conn.fetch("SELECT version FROM schema_migrations")
    return {int(row[0]) for row in rows}


async def migrate(conn: Any, migrations: Sequence[Migration] | None = None) -> list[int]:
    """Apply what is missing; returns the versions applied by this call (often none)."""
    todo = list(load_migrations() if migrations is None else migrations)
    done = await applied_versions(conn)
    applied: list[int] = []
    for migration in todo:
        if migration.version in done:
            continue
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
            await conn.execute(_CREATE_TABLE)
            already = await conn.fetchval(
                "SELECT true FROM schema_migrations WHERE version = $1", migration.version
            )
            if already:
                continue  # another instance applied it while we waited for the lock
            # No arguments: the simple query protocol, so one file may hold many statements.
            await conn.execute(migration.sql)
            await conn.execute(
                "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                migration.version,
                migration.name,
            )
        applied.append(migration.version)
        log.info("applied migration %04d_%s", migration.version, migration.name)
    return applied


async def check_schema(conn: Any, migrations: Sequence[Migration] | None = None) -> None:
    """Raise ``SchemaError`` when a migration this server needs is not applied.

    A database ahead of this server (a newer instance migrated it during a rolling deploy) is
    accepted: migrations are written to be compatible with the previous release.
    """
    todo = list(load_migrations() if migrations is None else migrations)
    done = await applied_versions(conn)
    missing = [m.version for m in todo if m.version not in done]
    if missing:
        raise SchemaError(
            f"database schema lacks migrations {missing}: run `chatserver migrate` "
            "or start with --migrate yes"
        )
    newer = sorted(v for v in done if v > max((m.version for m in todo), default=0))
    if newer:
        log.warning("database has migrations this server does not know: %s", newer)
