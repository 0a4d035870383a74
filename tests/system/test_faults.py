"""Nothing acked is ever lost, whatever fails (3 instances, Redis with AOF, Postgres)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from redis.asyncio import Redis

from chatclient.client import ChatApi
from chatclient.member import Member
from protocol import CloseCode
from storage.redis_keys import DEFAULT_PREFIX, ConversationKeys
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


async def _running_reply(redis_url: str, conversation_id: str) -> tuple[str, str, int] | None:
    """The conversation's running reply as Redis holds it: (generation, owner, deltas)."""
    redis = Redis.from_url(redis_url)
    try:
        reply = await redis.hgetall(ConversationKeys(DEFAULT_PREFIX, conversation_id).reply)
    finally:
        await redis.aclose()
    if b"gid" not in reply:
        return None
    return reply[b"gid"].decode(), reply[b"owner"].decode(), int(reply.get(b"seq", 0))


async def test_kill_9_of_an_instance_mid_traffic_and_mid_reply(
    tmp_path: Path, aof_redis: RedisServer, postgres_dsn: str
) -> None:
    killed: list[str] = []

    async def kill(servers: list[ServerProc], members: list[Member]) -> None:
        # Frozen (SIGSTOP) while Redis is read, so that what is read is what the kill cuts
        # short: a reply of this instance's with deltas out. Else thawed, and looked again.
        victim = servers[0]
        assert victim.proc is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while not killed:
            assert loop.time() < deadline, "no reply streamed on the instance to kill"
            victim.proc.send_signal(signal.SIGSTOP)
            running = await _running_reply(aof_redis.url, members[0].conversation_id)
            if running is not None and running[1] == victim.env["CHAT_SERVER_ID"] and running[2]:
                victim.kill()
                killed.append(running[0])
            else:
                victim.proc.send_signal(signal.SIGCONT)
                await asyncio.sleep(0.02)  # the pace of the looks, not a wait for an event

    outcome = await run_with_fault(tmp_path, aof_redis.url, postgres_dsn, kill)
    check(outcome)
    # The reply cut short by the kill was ended for the members all the same.
    ended = set().union(*(set(m.ledger.replies_ended) for m in outcome.members))
    assert killed and killed[0] in ended, f"reply {killed} never ended"


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
    drained: list[Member] = []
    moved: dict[str, int] = {}  # member -> messages acked when it had moved

    async def drain(servers: list[ServerProc], members: list[Member]) -> None:
        draining = servers[1]
        assert draining.proc is not None
        drained.extend(m for m in members if m.url == draining.ws_url)
        assert drained, "no member was on the instance to drain"
        told = {m.user: len(m.ledger.reconnects) for m in drained}
        draining.proc.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.to_thread(draining.proc.wait, 30)
        except subprocess.TimeoutExpired:  # what the instance was doing, in its log
            raise AssertionError("not drained in 30 s:\n" + draining.output[-8000:]) from None
        assert code == 0, draining.output[-4000:]
        for member in drained:
            # Told to go elsewhere (a `reconnect` frame) by the drained instance, not cut off.
            assert member.ledger.reconnects[told[member.user] :] == [draining.ws_url], member.user
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 15
        while not all(m.url not in (None, draining.ws_url) for m in drained):
            assert loop.time() < deadline, {m.user: m.url for m in drained}
            await asyncio.sleep(0.05)
        moved.update({m.user: len(m.ledger.acked) for m in drained})

    outcome = await run_with_fault(tmp_path, aof_redis.url, postgres_dsn, drain)
    check(outcome)
    # The members it sent away went on talking, acked by the instances that took them.
    for member in drained:
        assert len(member.ledger.acked) > moved[member.user], member.user


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
        redis = Redis.from_url(aof_redis.url)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 15
        try:
            # Traffic keeps flowing into the outbox; writers read batches they cannot store.
            # Held half a second after the stop, an entry is one of those (a batch stored
            # just before the stop is acked within milliseconds).
            while not (
                held := await redis.xpending_range(
                    "chat:outbox", "writers", min="-", max="+", count=1000, idle=500
                )
            ):
                assert loop.time() < deadline, "no entry was pending before the kill"
                await asyncio.sleep(0.05)
            owners = {entry["consumer"].decode() for entry in held}
        finally:
            await redis.aclose()
        victim = next(s for s in servers if s.env["CHAT_SERVER_ID"] in owners)
        victim.kill()
        await asyncio.to_thread(postgres_server.start)

    outcome = await run_with_fault(tmp_path, aof_redis.url, postgres_dsn, kill_while_holding)
    check(outcome)
