"""Nothing acked is ever lost, whatever fails (3 instances, Redis with AOF, Postgres)."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from chatserver.member import Member
from tests.serverproc import ServerProc
from tests.services import PostgresServer, RedisServer

from .faults import check, run_with_fault

POSTGRES_DOWN_S = 20.0


@pytest.fixture
def aof_redis() -> Iterator[RedisServer]:
    redis = RedisServer(appendonly=True)
    redis.start()
    yield redis
    redis.close()


async def test_kill_9_of_an_instance_mid_traffic_and_mid_reply(
    tmp_path: Path, aof_redis: RedisServer, postgres_dsn: str
) -> None:
    async def kill(servers: list[ServerProc], members: list[Member]) -> None:
        servers[0].kill()

    outcome = await run_with_fault(tmp_path, aof_redis.url, postgres_dsn, kill)
    check(outcome)


async def test_postgres_stopped_then_started(
    tmp_path: Path, aof_redis: RedisServer, postgres_dsn: str, postgres_server: PostgresServer
) -> None:
    async def outage(servers: list[ServerProc], members: list[Member]) -> None:
        await asyncio.to_thread(postgres_server.stop)
        await asyncio.sleep(POSTGRES_DOWN_S)  # clients keep sending meanwhile
        await asyncio.to_thread(postgres_server.start)

    outcome = await run_with_fault(tmp_path, aof_redis.url, postgres_dsn, outage)
    check(outcome)


async def test_redis_restarted_with_aof(
    tmp_path: Path, aof_redis: RedisServer, postgres_dsn: str
) -> None:
    async def restart(servers: list[ServerProc], members: list[Member]) -> None:
        await asyncio.to_thread(aof_redis.stop)
        await asyncio.to_thread(aof_redis.start)

    outcome = await run_with_fault(tmp_path, aof_redis.url, postgres_dsn, restart)
    check(outcome)
    assert sum(m.ledger.connects for m in outcome.members) > len(outcome.members)


async def test_sigterm_drain_while_the_others_take_its_clients(
    tmp_path: Path, aof_redis: RedisServer, postgres_dsn: str
) -> None:
    async def drain(servers: list[ServerProc], members: list[Member]) -> None:
        assert servers[1].proc is not None
        servers[1].proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(servers[1].proc.wait, 30) == 0

    outcome = await run_with_fault(tmp_path, aof_redis.url, postgres_dsn, drain)
    check(outcome)


async def test_reconnect_storm_of_one_instances_clients(
    tmp_path: Path, aof_redis: RedisServer, postgres_dsn: str
) -> None:
    async def storm(servers: list[ServerProc], members: list[Member]) -> None:
        # Every client on instance 0 loses its connection at the same moment.
        for member in members:
            client = member.client
            if client is not None and client.ws._response.url.port == servers[0].port:
                transport = client.ws._conn.transport if client.ws._conn else None
                if transport is not None:
                    transport.abort()

    outcome = await run_with_fault(tmp_path, aof_redis.url, postgres_dsn, storm)
    check(outcome)
