"""Nothing acked is ever lost, whatever fails (3 instances, Redis with AOF, Postgres)."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from redis.asyncio import Redis

from chatclient.client import ChatApi
from chatclient.member import Member
from protocol import CloseCode
from tests.chatserver.rawws import RawWebSocket
from tests.serverproc import ServerProc
from tests.services import PostgresReplica, PostgresServer, RedisServer

from .faults import check, run_with_fault
from .scaleout import token

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


async def _slow_consumers(server: ServerProc) -> float:
    async with aiohttp.ClientSession() as http, http.get(f"{server.url}/metrics") as resp:
        for line in (await resp.text()).splitlines():
            if line.startswith("chat_slow_consumers_total "):
                return float(line.split()[1])
    return 0.0


async def test_a_slow_consumer_and_a_reconnect_storm(
    tmp_path: Path, aof_redis: RedisServer, postgres_dsn: str
) -> None:
    codes: list[int] = []

    async def storm(servers: list[ServerProc], members: list[Member]) -> None:
        # A member that stops reading, beside the others on instance 0...
        conversation = members[0].conversation_id
        raw = await RawWebSocket.connect("127.0.0.1", servers[0].port, token("member1"))
        await raw.send_text('{"type":"join","conversation_id":"%s"}' % conversation)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while not await _slow_consumers(servers[0]):  # traffic piles up in front of it
            assert loop.time() < deadline, "the slow consumer was never cut off"
            await asyncio.sleep(0.1)
        _, code = await raw.read_until_close()  # what it finds when it reads at last
        raw.close()
        codes.append(code)
        # ...then every client of instance 0 loses its connection at the same moment.
        for member in members:
            client = member.client
            if client is not None and client.ws._response.url.port == servers[0].port:
                transport = client.ws._conn.transport if client.ws._conn else None
                if transport is not None:
                    transport.abort()

    outcome = await run_with_fault(
        tmp_path,
        aof_redis.url,
        postgres_dsn,
        storm,
        env={"CHAT_SEND_BUFFER_BYTES": "16384", "CHAT_TCP_SEND_BUFFER_BYTES": "4096"},
    )
    check(outcome)
    assert codes == [CloseCode.SLOW_CONSUMER]
    assert sum(m.ledger.connects for m in outcome.members) > len(outcome.members)


async def test_the_read_replica_stopped(
    tmp_path: Path, aof_redis: RedisServer, postgres_dsn: str, postgres_replica: PostgresReplica
) -> None:
    replica_url = postgres_replica.dsn_for(postgres_dsn.rsplit("/", 1)[1])

    async def stop_replica(servers: list[ServerProc], members: list[Member]) -> None:
        await asyncio.to_thread(postgres_replica.stop)

    async def lagging_reads(servers: list[ServerProc]) -> None:
        # Reads that may lag (lists, older pages) fall back to the primary.
        async with aiohttp.ClientSession() as http:
            api = ChatApi(servers[0].url, token("member0"), http)
            status, body = await api.request("GET", "/api/conversations")
            assert status == 200 and len(body["items"]) == 1
            conv = body["items"][0]["id"]
            status, page = await api.request(
                "GET", f"/api/conversations/{conv}/messages?before=3&limit=2"
            )
            assert status == 200 and [m["offset"] for m in page["items"]] == [1, 2]

    outcome = await run_with_fault(
        tmp_path,
        aof_redis.url,
        postgres_dsn,
        stop_replica,
        read_database_url=replica_url,
        probe=lagging_reads,
    )
    check(outcome)


async def test_kill_9_with_outbox_entries_pending_another_instance_stores_them(
    tmp_path: Path, aof_redis: RedisServer, postgres_dsn: str, postgres_server: PostgresServer
) -> None:
    async def kill_while_holding(servers: list[ServerProc], members: list[Member]) -> None:
        # With Postgres down every writer holds the batch it read (pending in the group),
        # then the instance holding some of them dies; another one claims them.
        await asyncio.to_thread(postgres_server.stop)
        await asyncio.sleep(2.0)  # traffic keeps flowing into the outbox meanwhile
        redis = Redis.from_url(aof_redis.url)
        try:
            pending = await redis.xpending("chat:outbox", "writers")
            assert pending["pending"] > 0, "no entry was pending before the kill"
            owners = {c["name"].decode() for c in pending["consumers"]}
        finally:
            await redis.aclose()
        victim = next(s for s in servers if s.env["CHAT_SERVER_ID"] in owners)
        victim.kill()
        await asyncio.to_thread(postgres_server.start)

    outcome = await run_with_fault(tmp_path, aof_redis.url, postgres_dsn, kill_while_holding)
    check(outcome)
