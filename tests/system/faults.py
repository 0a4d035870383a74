"""A run with traffic on three instances, a fault in the middle, and the ledger checks.

Members behave like the browser client (chatclient.member.Member). After the fault the
run goes on, then every member settles (one last rejoin with `since`) and the ledger is
checked against Postgres: every acked message stored exactly once, no member left with a
gap it was not told about, no duplicate delivery, every started reply ended.
"""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import asyncpg  # type: ignore[import-untyped]
from redis.asyncio import Redis

from chatclient.client import ChatApi
from chatclient.member import Member
from tests.serverproc import ServerProc

from .scaleout import AUTH, instances, token

Fault = Callable[[list[ServerProc], list[Member]], Awaitable[None]]


@dataclass
class Outcome:
    members: list[Member]
    servers: list[ServerProc]
    acked: set[str]
    stored: dict[str, int]  # message id -> copies in Postgres
    gaps: list[str]  # members left without offsets they were not told to reload
    healthy_after: bool  # the surviving instances ready again without a hand


async def wait_answered(dsn: str, acked: set[str], timeout: float) -> dict[str, int]:
    """Stored answers per acked question (``reply_to``), once each has one or at the timeout."""
    return await _wait_counted(
        dsn,
        "SELECT reply_to AS id, count(*) AS n FROM messages WHERE role = 'assistant' "
        "AND reply_to = ANY($1::text[]) GROUP BY reply_to",
        acked,
        timeout,
    )


async def wait_stored(dsn: str, acked: set[str], timeout: float) -> dict[str, int]:
    """Copies in Postgres per acked message id, once each has one or at the timeout."""
    return await _wait_counted(
        dsn,
        "SELECT id::text AS id, count(*) AS n FROM messages WHERE id::text = ANY($1::text[])"
        " GROUP BY id",
        acked,
        timeout,
    )


async def _wait_counted(dsn: str, sql: str, ids: set[str], timeout: float) -> dict[str, int]:
    """``sql``'s (id, n) rows for ``ids``, polled until every id has a row or the timeout."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        db = await asyncpg.connect(dsn)
        try:
            rows = await db.fetch(sql, list(ids))
        finally:
            await db.close()
        counted = {r["id"]: r["n"] for r in rows}
        if set(counted) >= ids or loop.time() > deadline:
            return counted
        await asyncio.sleep(0.2)


def members_quiet(crowd: list[Member]) -> bool:
    """Nothing unacked, and every reply any member saw start was seen to end by someone."""
    if any(m._unacked for m in crowd):
        return False
    started = set().union(*(m.ledger.replies_started for m in crowd))
    ended = set().union(*(set(m.ledger.replies_ended) for m in crowd))
    return started <= ended


async def servers_quiet(servers: list[ServerProc], redis_url: str) -> bool:
    """No instance holds a reply, and no question is left without its answer: no
    conversation lists an unfinished reply job (a dead instance's included)."""
    admin = AUTH.issue("operator", role="admin")
    async with aiohttp.ClientSession() as http:
        for server in servers:
            if not server.running:
                continue
            try:
                async with http.get(
                    f"{server.url}/api/admin/stats", headers={"Authorization": f"Bearer {admin}"}
                ) as resp:
                    if resp.status != 200 or (await resp.json())["replies_pending"]:
                        return False
            except aiohttp.ClientError:
                return False
    redis = Redis.from_url(redis_url)
    try:
        async for _ in redis.scan_iter(match="chat:*:reply_jobs", count=1000):
            return False
        return True
    finally:
        await redis.aclose()


def open_replies(crowd: list[Member]) -> str:
    started = set().union(*(m.ledger.replies_started for m in crowd))
    ended = set().union(*(set(m.ledger.replies_ended) for m in crowd))
    unacked = {m.user: m._unacked for m in crowd if m._unacked}
    seen_by = {g: [m.user for m in crowd if g in m.ledger.replies_started] for g in started - ended}
    return f"replies open 30 s after the traffic stopped: {seen_by}; unacked: {unacked}"


def healthy(server: ServerProc) -> bool:
    try:
        with urllib.request.urlopen(f"{server.url}/readyz", timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


async def run_with_fault(
    tmp_path: Path,
    redis_url: str,
    database_url: str,
    fault: Fault,
    *,
    members: int = 6,
    before_s: float = 2.0,
    after_s: float = 3.0,
    env: dict[str, str] | None = None,
    read_database_url: str | None = None,
    probe: Callable[[list[ServerProc]], Awaitable[None]] | None = None,
) -> Outcome:
    base = {"CHAT_LOCAL_TOKEN_MS": "20", "CHAT_OUTBOX_CLAIM_IDLE_MS": "3000", **(env or {})}
    with instances(tmp_path, redis_url, count=3, env=base, database_url=database_url) as servers:
        users = [f"member{i}" for i in range(members)]
        async with aiohttp.ClientSession() as http:
            api = ChatApi(servers[0].url, token(users[0]), http)
            conv = str((await api.create_conversation(members=users[1:]))["id"])
        urls = [s.ws_url for s in servers]
        crowd = [
            Member(urls, user, token, conv, send_every_s=0.4, start_at=i)
            for i, user in enumerate(users)
        ]
        stop = asyncio.Event()
        tasks = [asyncio.create_task(m.run(stop)) for m in crowd]
        await asyncio.sleep(before_s)  # traffic flows (the run's own duration, not a sync)
        await fault(servers, crowd)
        await asyncio.sleep(after_s)
        # Stop talking, keep listening: every reply started must be seen to end.
        for member in crowd:
            member.sending = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while not (members_quiet(crowd) and await servers_quiet(servers, redis_url)):
            assert loop.time() < deadline, open_replies(crowd)
            await asyncio.sleep(0.1)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
        # The replies still streaming end (or are ended by the lease sweep) before settling.
        alive = [s for s in servers if s.running]
        deadline = loop.time() + 20
        while not all(healthy(s) for s in alive):
            assert loop.time() < deadline, "instances did not come back healthy by themselves"
            await asyncio.sleep(0.2)
        gaps = []
        for member in crowd:
            # One last rejoin with `since`: it must leave the member holding everything.
            joined = await member.settle(alive[0].ws_url)
            if member.ledger.prefix() != joined.offset:
                gaps.append(f"{member.user} holds {member.ledger.prefix()} of {joined.offset}")
        acked = set().union(*(set(m.ledger.acked) for m in crowd))
        stored = await wait_stored(database_url, acked, timeout=40)
        healthy_after = all(healthy(s) for s in alive)
        if probe is not None:
            await probe(servers)
        return Outcome(crowd, servers, acked, stored, gaps, healthy_after)


def check(outcome: Outcome) -> None:
    """The promise, checked from the clients' ledgers against Postgres."""
    lost = outcome.acked - set(outcome.stored)
    assert not lost, f"{len(lost)} acked messages not stored"
    copies = {mid: n for mid, n in outcome.stored.items() if n != 1}
    assert not copies, f"stored more than once: {copies}"
    assert len(outcome.acked) > 10, "too little traffic to judge"
    for member in outcome.members:
        ledger = member.ledger
        assert ledger.duplicates == 0, f"{member.user} got {ledger.duplicates} duplicates"
        assert ledger.bad_recoveries == [], f"{member.user}: {ledger.bad_recoveries}"
    started = set().union(*(m.ledger.replies_started for m in outcome.members))
    ended = set().union(*(set(m.ledger.replies_ended) for m in outcome.members))
    assert started <= ended, f"{len(started - ended)} replies started but never ended"
    assert outcome.gaps == [], outcome.gaps
    assert outcome.healthy_after
