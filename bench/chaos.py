"""Chaos run: load on three instances while faults strike at random, then the ledger.

    .venv/bin/python bench/chaos.py --minutes 5

Starts its own Redis (AOF), Postgres primary and streaming replica, and three chatserver
instances; members (chatclient.member.Member, which reconnect and recover the way the
browser client does) talk in several conversations the whole time. Every 10-25 s
(``--every``) one fault strikes: kill -9 of an instance (restarted a few seconds later, as an
orchestrator would), SIGTERM drain of one, Redis restarted, Postgres stopped for 10-20 s, the
replica stopped (restarted later), or a reconnect storm. At the end the members stop
sending, every reply still open is waited for, each member rejoins once, and the ledger is
checked against Postgres. Exit status 1 on any lost or duplicated message, any untold gap,
any duplicate delivery or any reply that started and never ended.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402

from chatclient.client import ChatApi  # noqa: E402
from chatclient.member import Member  # noqa: E402
from chatserver.generation.jobs import generation_id_for  # noqa: E402
from tests.serverproc import ServerProc, ServerProcError  # noqa: E402
from tests.services import PostgresReplica, PostgresServer, RedisServer  # noqa: E402
from tests.system.faults import (  # noqa: E402
    healthy,
    members_quiet,
    open_replies,
    servers_quiet,
    wait_answered,
    wait_stored,
)
from tests.system.scaleout import SECRET, token  # noqa: E402

RESULTS = ROOT / "bench" / "results"
UNLIMITED = "messages_per_minute=100000,connections=1000,daily_tokens=1000000000"


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


class Cluster:
    def __init__(self, workdir: Path, redis: RedisServer, dsn: str, replica_dsn: str) -> None:
        env = {
            "CHAT_JWT_SECRET": SECRET,
            "CHAT_LOCAL_TTFT_MS": "20",
            "CHAT_LOCAL_TOKEN_MS": "5",
            "CHAT_MAX_QUEUED_REPLIES": "100",
            "CHAT_REPLY_LEASE_S": "2",
            "CHAT_OUTBOX_CLAIM_IDLE_MS": "5000",
            "CHAT_SHUTDOWN_GRACE_S": "5",
            "CHAT_LOG_LEVEL": "warning",
            "CHAT_LIMITS_FREE": UNLIMITED,
        }
        self.servers = [
            ServerProc(
                workdir / f"instance-{i}",
                env={**env, "CHAT_SERVER_ID": f"instance-{i}"},
                args=[
                    "--redis-url",
                    redis.url,
                    "--database-url",
                    dsn,
                    "--read-database-url",
                    replica_dsn,
                    "--migrate",
                    "yes",
                ],
            )
            for i in range(3)
        ]

    def start(self) -> None:
        for server in self.servers:
            server.start()

    def close(self) -> None:
        for server in self.servers:
            server.close()


# Instances between their fault and the end of their restart: no second fault strikes them
# (a kill during start-up leaves its restart to this one, which tries again).
_restarting: set[ServerProc] = set()


async def _restart_later(server: ServerProc, delay_s: float) -> None:
    _restarting.add(server)
    try:
        await asyncio.sleep(delay_s)
        for attempt in range(1, 4):
            try:
                await asyncio.to_thread(server.start)
                return
            except ServerProcError as exc:  # as an orchestrator would, it tries again
                log(f"restart {attempt} of {server.log_path.parent.name} failed: {exc}")
    finally:
        _restarting.discard(server)


async def inject(
    kind: str,
    cluster: Cluster,
    redis: RedisServer,
    primary: PostgresServer,
    replica: PostgresReplica,
    members: list[Member],
    background: set[asyncio.Task[None]],
) -> None:
    alive = [s for s in cluster.servers if s.running and s not in _restarting]
    if kind in ("kill9", "sigterm") and len(alive) < 2:
        kind = "redis"  # keep at least two instances serving
    if kind == "kill9":
        victim = random.choice(alive)
        victim.kill()
        task = asyncio.create_task(_restart_later(victim, random.uniform(3, 8)))
    elif kind == "sigterm":
        victim = random.choice(alive)
        assert victim.proc is not None
        victim.proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(victim.proc.wait, 30)
        task = asyncio.create_task(_restart_later(victim, random.uniform(2, 5)))
    elif kind == "redis":
        await asyncio.to_thread(redis.stop)
        await asyncio.to_thread(redis.start)
        return
    elif kind == "postgres":
        await asyncio.to_thread(primary.stop)
        await asyncio.sleep(random.uniform(10, 20))  # clients keep sending meanwhile
        await asyncio.to_thread(primary.start)
        return
    elif kind == "replica":
        await asyncio.to_thread(replica.stop)
        task = asyncio.create_task(_later(random.uniform(5, 15), replica.start))
    else:  # storm: every client of one instance loses its connection at once
        victim = random.choice(alive)
        for member in members:
            client = member.client
            if client is not None and client.ws._response.url.port == victim.port:
                conn = client.ws._conn
                if conn is not None and conn.transport is not None:
                    conn.transport.abort()
        return
    background.add(task)
    task.add_done_callback(background.discard)


async def _reply_slots(redis_url: str) -> dict[str, dict[str, str]]:
    """Every conversation's reply hash still in Redis: whose, which generation, how far."""
    from redis.asyncio import Redis

    redis = Redis.from_url(redis_url, decode_responses=True)
    try:
        return {key: await redis.hgetall(key) async for key in redis.scan_iter("chat:*:reply")}
    finally:
        await redis.aclose()


def _clock(at: float) -> str:
    """A wall-clock time as the instances' logs write it (UTC, to the millisecond)."""
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds")


def _log_lines_naming(workdir: Path, ids: set[str]) -> list[str]:
    """Every instance's log lines that name one of ``ids``, in time order."""
    found = [
        f"{path.parent.name}: {line.rstrip()}"
        for path in sorted(workdir.glob("*/*.log"))
        for line in path.read_text(errors="replace").splitlines()
        if any(i in line for i in ids)
    ]
    return sorted(found, key=lambda line: line.partition('"time": "')[2][:23])


async def _later(delay_s: float, action: Any) -> None:
    await asyncio.sleep(delay_s)
    await asyncio.to_thread(action)


FAULTS = ("kill9", "sigterm", "redis", "postgres", "replica", "storm")


async def run(
    minutes: float,
    conversations: int,
    per_conversation: int,
    seed: int,
    faults_drawn: tuple[str, ...] = FAULTS,
    every_s: tuple[float, float] = (10.0, 25.0),
) -> dict[str, Any]:
    random.seed(seed)
    workdir = Path(tempfile.mkdtemp(prefix="chaos-"))
    redis = RedisServer(appendonly=True)
    primary = PostgresServer()
    redis.start()
    primary.start()
    dsn = primary.create_database("chaos")
    replica = PostgresReplica(primary)
    replica.start()
    cluster = Cluster(workdir, redis, dsn, replica.dsn_for("chaos"))
    cluster.start()
    faults: Counter[str] = Counter()
    background: set[asyncio.Task[None]] = set()
    try:
        members: list[Member] = []
        urls = [s.ws_url for s in cluster.servers]
        async with aiohttp.ClientSession() as http:
            for c in range(conversations):
                users = [f"c{c}m{i}" for i in range(per_conversation)]
                api = ChatApi(cluster.servers[c % 3].url, token(users[0]), http)
                conv = str((await api.create_conversation(members=users[1:]))["id"])
                log(f"conversation c{c}: {conv}")
                members += [
                    Member(urls, u, token, conv, send_every_s=1.0, start_at=c + i)
                    for i, u in enumerate(users)
                ]
        stop = asyncio.Event()
        tasks = [asyncio.create_task(m.run(stop)) for m in members]
        started = time.monotonic()
        end = started + minutes * 60
        log(f"{len(members)} members in {conversations} conversations on 3 instances")
        while time.monotonic() < end - 15:
            await asyncio.sleep(random.uniform(*every_s))
            kind = random.choice(faults_drawn)
            faults[kind] += 1
            log(f"fault: {kind} (acked so far: {sum(len(m.ledger.acked) for m in members)})")
            await inject(kind, cluster, redis, primary, replica, members, background)
        if background:
            await asyncio.gather(*background)
        if not replica.running:
            await asyncio.to_thread(replica.start)
        for server in cluster.servers:
            if not server.running:
                await asyncio.to_thread(server.start)
        log("faults over: members stop sending, open replies end")
        for member in members:
            member.sending = False
        deadline = time.monotonic() + 120
        while not (members_quiet(members) and await servers_quiet(cluster.servers, redis.url)):
            if time.monotonic() > deadline:
                log("replies still open 120 s after the traffic stopped: " + open_replies(members))
                log(f"servers quiet: {await servers_quiet(cluster.servers, redis.url)}")
                break
            await asyncio.sleep(0.2)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 60)
        gaps = []
        for member in members:
            joined = await member.settle(cluster.servers[0].ws_url)
            if member.ledger.prefix() != joined.offset:
                gaps.append(member.user)
        acked = set().union(*(set(m.ledger.acked) for m in members))
        stored = await wait_stored(dsn, acked, timeout=60)
        questions = {mid for m in members for mid in m.ledger.acked}
        answers = await wait_answered(dsn, questions, timeout=60)
        started_replies = set().union(*(m.ledger.replies_started for m in members))
        ended: dict[str, str] = {}
        for m in members:
            ended.update(m.ledger.replies_ended)
        never_ended = sorted(started_replies - set(ended))
        unanswered = sorted(questions - set(answers))
        if never_ended or unanswered:
            # The trail to follow in the instances' logs (their directory is kept).
            log(f"replies never ended: {never_ended}; questions unanswered: {unanswered}")
            for gid in never_ended:
                for m in members:
                    if gid in m.ledger.first_seen:
                        at, where = m.ledger.first_seen[gid]
                        log(f"  {gid} first seen by {m.user} at {_clock(at)} ({where})")
            log(f"the instances' logs: {workdir}")
            log(f"reply slots left in Redis: {await _reply_slots(redis.url)}")
            # An unanswered question's reply is its generation id: both trails are read.
            wanted = {*never_ended, *unanswered, *(generation_id_for(q) for q in unanswered)}
            for line in _log_lines_naming(workdir, wanted):
                log(f"  {line}")
        ledger = {
            "minutes": minutes,
            "seed": seed,
            "members": len(members),
            "faults": dict(faults),
            "sent": sum(m.ledger.sent for m in members),
            "acked": len(acked),
            "stored": sum(1 for mid in acked if mid in stored),
            "duplicated_in_store": sum(1 for n in stored.values() if n > 1),
            "lost": len(acked - set(stored)),
            "duplicate_deliveries": sum(m.ledger.duplicates for m in members),
            "bad_recoveries": sum(len(m.ledger.bad_recoveries) for m in members),
            "untold_gaps": len(gaps),
            "replies_started": len(started_replies),
            "replies_ended_by_reason": dict(
                Counter(ended[g] for g in started_replies if g in ended)
            ),
            "replies_never_ended": len(started_replies - set(ended)),
            # issue 19: every acked question has exactly one stored answer (goal: 0 and 0)
            "unanswered": len(questions - set(answers)),
            "answered_twice": sum(1 for n in answers.values() if n > 1),
            "reconnects": sum(m.ledger.connects for m in members) - len(members),
            "rejoins_recovered": sum(m.ledger.recovered for m in members),
            "rejoins_told_to_reload": sum(m.ledger.reloads for m in members),
            "refusals": dict(sum((Counter(m.ledger.refused) for m in members), Counter())),
            "instances_healthy_at_end": all(healthy(s) for s in cluster.servers),
        }
        return ledger
    finally:
        for task in background:
            task.cancel()
        cluster.close()
        replica.close()
        primary.close()
        redis.close()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--conversations", type=int, default=4)
    parser.add_argument("--members", type=int, default=5, help="members per conversation")
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument(
        "--faults",
        default=",".join(FAULTS),
        help="the faults drawn from, comma-separated (e.g. kill9: only instance deaths)",
    )
    parser.add_argument(
        "--every",
        default="10,25",
        help="seconds between faults, drawn between these two (closer faults: more overlap)",
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    try:
        low, high = (float(s) for s in args.every.split(","))
    except ValueError:
        parser.error("--every: two numbers of seconds, e.g. 10,25")
    if not 0 < low <= high:
        parser.error("--every: 0 < low <= high")
    drawn = tuple(f for f in args.faults.split(",") if f)
    if not drawn or set(drawn) - set(FAULTS):
        parser.error(f"--faults: choose from {', '.join(FAULTS)}")
    every = (low, high)
    ledger = asyncio.run(
        run(args.minutes, args.conversations, args.members, args.seed, drawn, every)
    )
    text = json.dumps(ledger, indent=2, sort_keys=True)
    print(text)
    out = args.out or RESULTS / f"chaos-{datetime.now(UTC):%Y-%m-%d}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    failed = (
        ledger["lost"]
        or ledger["duplicated_in_store"]
        or ledger["duplicate_deliveries"]
        or ledger["bad_recoveries"]
        or ledger["untold_gaps"]
        or ledger["replies_never_ended"]
        or ledger["unanswered"]
        or ledger["answered_twice"]
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
