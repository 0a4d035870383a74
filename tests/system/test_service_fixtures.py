"""The service fixtures give real, isolated, restartable Redis and Postgres servers."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator

import asyncpg  # type: ignore[import-untyped]
import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from tests.services import PostgresServer, RedisServer

MACHINE_PORTS = {6379, 5432}  # the machine's own servers: never ours


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


async def test_redis_ping_set_get(redis_url: str, redis_server: RedisServer) -> None:
    assert redis_server.port not in MACHINE_PORTS
    assert redis_url == f"redis://127.0.0.1:{redis_server.port}/0"
    client = aioredis.Redis.from_url(redis_url)
    try:
        assert await client.ping() is True
        await client.set("greeting", "héllo")
        assert await client.get("greeting") == "héllo".encode()
        info = await client.info("server")
        assert info["tcp_port"] == redis_server.port
        # started without persistence
        assert (await client.config_get("save"))["save"] == ""
        assert (await client.config_get("appendonly"))["appendonly"] == "no"
    finally:
        await client.aclose()


async def test_redis_url_starts_empty(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    try:
        assert await client.dbsize() == 0
        await client.set("left-behind", "1")
    finally:
        await client.aclose()


async def test_redis_url_is_flushed_between_tests(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    try:
        assert await client.exists("left-behind") == 0
        assert await client.dbsize() == 0
    finally:
        await client.aclose()


async def test_redis_survives_stop_start_on_same_port(
    redis_url: str, redis_server: RedisServer
) -> None:
    port = redis_server.port
    client = aioredis.Redis.from_url(redis_url)
    try:
        await client.set("k", "v")
        redis_server.stop()
        assert not redis_server.running
        assert not _port_open(port)
        with pytest.raises(RedisConnectionError):
            await client.ping()

        redis_server.start()
        assert redis_server.running
        assert redis_server.port == port
        assert redis_server.url == redis_url
        # the same client reconnects; nothing was persisted
        assert await client.ping() is True
        assert await client.get("k") is None
        await client.set("k", "again")
        assert await client.get("k") == b"again"
    finally:
        await client.aclose()


async def test_redis_kill_then_start(redis_url: str, redis_server: RedisServer) -> None:
    port = redis_server.port
    redis_server.kill()
    assert not _port_open(port)
    redis_server.start()
    client = aioredis.Redis.from_url(redis_url)
    try:
        assert await client.ping() is True
    finally:
        await client.aclose()


async def test_postgres_version(postgres_server: PostgresServer) -> None:
    assert postgres_server.port not in MACHINE_PORTS
    assert postgres_server.dsn == f"postgresql://postgres@127.0.0.1:{postgres_server.port}/postgres"
    conn = await asyncpg.connect(postgres_server.dsn)
    try:
        version = await conn.fetchval("SELECT version()")
        assert version.startswith("PostgreSQL ")
        assert await conn.fetchval("SHOW fsync") == "off"
        assert await conn.fetchval("SHOW port") == str(postgres_server.port)
        data_dir = await conn.fetchval("SHOW data_directory")
        assert data_dir == str(postgres_server.data_dir)
    finally:
        await conn.close()


async def test_postgres_table_roundtrip(postgres_dsn: str) -> None:
    conn = await asyncpg.connect(postgres_dsn)
    try:
        await conn.execute("CREATE TABLE notes (id bigserial PRIMARY KEY, body text NOT NULL)")
        await conn.executemany(
            "INSERT INTO notes (body) VALUES ($1)", [("first",), ("zweite",), ("第三",)]
        )
        rows = await conn.fetch("SELECT id, body FROM notes ORDER BY id")
        assert [(r["id"], r["body"]) for r in rows] == [(1, "first"), (2, "zweite"), (3, "第三")]
    finally:
        await conn.close()


@pytest.fixture
def other_postgres_dsn(postgres_server: PostgresServer) -> Iterator[str]:
    name = f"other_{uuid.uuid4().hex[:12]}"
    dsn = postgres_server.create_database(name)
    yield dsn
    postgres_server.drop_database(name)


async def test_postgres_dsn_databases_are_isolated(
    postgres_dsn: str, other_postgres_dsn: str
) -> None:
    assert postgres_dsn != other_postgres_dsn
    first = await asyncpg.connect(postgres_dsn)
    second = await asyncpg.connect(other_postgres_dsn)
    try:
        assert await first.fetchval("SELECT current_database()") != await second.fetchval(
            "SELECT current_database()"
        )
        await first.execute("CREATE TABLE only_here (x int)")
        await first.execute("INSERT INTO only_here VALUES (42)")
        assert await first.fetchval("SELECT x FROM only_here") == 42
        assert await second.fetchval("SELECT to_regclass('only_here')") is None
        with pytest.raises(asyncpg.UndefinedTableError):
            await second.fetchval("SELECT x FROM only_here")
    finally:
        await first.close()
        await second.close()


async def test_postgres_dsn_starts_empty(postgres_dsn: str) -> None:
    conn = await asyncpg.connect(postgres_dsn)
    try:
        count = await conn.fetchval(
            "SELECT count(*) FROM pg_tables WHERE schemaname NOT IN ('pg_catalog', "
            "'information_schema')"
        )
        assert count == 0
    finally:
        await conn.close()


async def test_postgres_survives_stop_start_on_same_port(
    postgres_server: PostgresServer, postgres_dsn: str
) -> None:
    port = postgres_server.port
    conn = await asyncpg.connect(postgres_dsn)
    await conn.execute("CREATE TABLE kept (x int)")
    await conn.execute("INSERT INTO kept VALUES (7)")
    postgres_server.stop()
    try:
        assert not postgres_server.running
        assert not _port_open(port)
        with pytest.raises((asyncpg.PostgresError, OSError, asyncpg.InterfaceError)):
            await conn.fetchval("SELECT 1")
    finally:
        conn.terminate()
        postgres_server.start()
    assert postgres_server.port == port
    conn = await asyncpg.connect(postgres_dsn)
    try:
        # a committed row survives an immediate stop (crash recovery replays the WAL)
        assert await conn.fetchval("SELECT x FROM kept") == 7
    finally:
        await conn.close()
