"""Throwaway Redis and Postgres servers for the tests.

Each server lives in its own temporary directory on a free port of 127.0.0.1 and never touches
the machine's own databases. Readiness is polled with a deadline; nothing sleeps to synchronise.
When the tests run as root, the Postgres tools run as the ``postgres`` user through ``runuser``
(``initdb`` and ``pg_ctl`` refuse to run as root).
"""

from .base import ServiceError, _die_with_parent, _temp_base, free_port, installed
from .pgbouncer import PgBouncer, find_pgbouncer
from .postgres import PostgresReplica, PostgresServer, find_postgres_bindir
from .redis import RedisClusterServer, RedisServer, find_redis_server, redis_command

__all__ = [
    "PgBouncer",
    "PostgresReplica",
    "PostgresServer",
    "RedisClusterServer",
    "RedisServer",
    "ServiceError",
    "_die_with_parent",
    "_temp_base",
    "find_pgbouncer",
    "find_postgres_bindir",
    "find_redis_server",
    "free_port",
    "installed",
    "redis_command",
]
