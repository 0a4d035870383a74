"""A real `chatserver serve` on Postgres keeps acking while Postgres is down for 20 s, then
stores every acked message exactly once when it is back.

Marked ``heavy``: its 20 s outage starts first on its xdist worker, beside the short tests on
the others, instead of adding 20 s to the end of the run.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import asyncpg  # type: ignore[import-untyped]
import pytest

from chatclient.client import ChatApi, ChatClient, ChatError
from tests.serverproc import ServerProc
from tests.services import PostgresServer

# From the stop to the start; well past the batch writer's backoff cap (5 s), so the writer
# retries at its longest wait several times over, and is in it when Postgres comes back.
PG_DOWN_S = 20.0
DRAIN_TIMEOUT_S = 30.0
EVENT_TIMEOUT_S = 15.0
SAMPLE_EVERY_S = 0.5  # how often readiness is sampled through the outage


def _metric(text: str, name: str) -> float:
    found = re.search(rf"^{name} ([0-9.e+]+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


async def until(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll ``condition`` until it holds; fail after ``EVENT_TIMEOUT_S``."""
    deadline = time.monotonic() + EVENT_TIMEOUT_S
    while not await condition():
        assert time.monotonic() < deadline, f"not within {EVENT_TIMEOUT_S} s: {what}"
        await asyncio.sleep(0.05)


@pytest.mark.heavy
async def test_postgres_outage_keeps_acking_and_loses_nothing(
    tmp_path: Path, postgres_dsn: str, postgres_server: PostgresServer
) -> None:
    server = ServerProc(
        tmp_path,
        env={
            "CHAT_LOCAL_TTFT_MS": "1",
            "CHAT_LOCAL_TOKEN_MS": "0",
            "CHAT_LOG_LEVEL": "error",
            # The test's tokens come from /api/dev/token: allowed explicitly with Postgres.
            "CHAT_ALLOW_DEV_AUTH": "yes",
            # Rate limits are not under test here: sends must not wait on them.
            "CHAT_LIMITS_FREE": "messages_per_minute=100000,connections=5,daily_tokens=1000000000",
        },
        args=["--database-url", postgres_dsn, "--migrate", "yes", "--pg-command-timeout-s", "3"],
    )
    server.start()
    acked: list[str] = []
    stop = asyncio.Event()
    try:
        async with aiohttp.ClientSession() as http:
            api = ChatApi(server.url, None, http)

            async def user(name: str) -> tuple[ChatClient, str]:
                api.token = await api.dev_token(name)
                conv = str((await api.create_conversation())["id"])
                client = await ChatClient.connect(server.ws_url, api.token, http=http)
                await client.join(conv)
                return client, conv

            people = [await user(name) for name in ("alice", "bob", "carol")]

            async def chat(client: ChatClient, conv: str) -> None:
                i = 0
                while not stop.is_set():
                    ack = await client.send_reliably(conv, f"message {i}")
                    acked.append(ack.message_id)
                    await client.reply(reply_to=ack.message_id, timeout=10)
                    i += 1
                    await asyncio.sleep(0.01)

            async def metrics() -> str:
                async with http.get(f"{server.url}/metrics") as resp:
                    return await resp.text()

            async def ready() -> int:
                async with http.get(f"{server.url}/readyz") as resp:
                    return resp.status

            async def persisted() -> float:
                return _metric(await metrics(), "chat_messages_persisted_total")

            async def errors() -> float:
                return _metric(await metrics(), "chat_persist_errors_total")

            chats = [asyncio.create_task(chat(c, conv)) for c, conv in people]

            async def flowing() -> bool:  # every member acked and answered, and stored
                return len(acked) >= 2 * len(people) and await persisted() >= len(people)

            await until(flowing, "traffic acked and stored before the outage")
            assert await ready() == 200
            assert await errors() == 0

            await asyncio.to_thread(postgres_server.stop)
            down_since = time.monotonic()
            acked_before = len(acked)

            async def outage_seen() -> bool:  # readiness says so; a batch write has failed
                return await ready() == 503 and await errors() >= 1

            await until(outage_seen, "readiness 503 and a failed batch write")
            # Nothing commits with the server stopped: what is persisted now stays so.
            persisted_down, errors_down = await persisted(), await errors()
            readiness = []
            while time.monotonic() - down_since < PG_DOWN_S:  # the outage's length
                readiness.append(await ready())
                await asyncio.sleep(SAMPLE_EVERY_S)
            # Readiness said 503 all along; sends went on being acked (and answered); nothing
            # reached the store; the writer kept retrying.
            assert set(readiness) == {503}, readiness
            assert len(readiness) >= (PG_DOWN_S - EVENT_TIMEOUT_S) / SAMPLE_EVERY_S
            assert len(acked) - acked_before >= 50
            assert await persisted() == persisted_down
            assert await errors() >= errors_down + 2

            await asyncio.to_thread(postgres_server.start)

            async def ready_again() -> bool:
                return await ready() == 200

            await until(ready_again, "readiness 200 once Postgres is back")
            stop.set()
            try:
                await asyncio.wait_for(asyncio.gather(*chats), 30)
            except ChatError as exc:  # which dependency failed, from the server's own log
                raise AssertionError(f"{exc}; server log:\n{server.output[-4000:]}") from exc
            for client, _ in people:
                await client.close()

            # The backlog drains: every acked message (and its reply) reaches Postgres once.
            conn = await asyncpg.connect(postgres_dsn)
            try:
                deadline = time.monotonic() + DRAIN_TIMEOUT_S
                while True:
                    stored = await conn.fetchval(
                        "SELECT count(*) FROM messages WHERE id = ANY($1::text[])", acked
                    )
                    replies = await conn.fetchval(
                        "SELECT count(*) FROM messages WHERE reply_to = ANY($1::text[])", acked
                    )
                    done = stored == replies == len(acked)
                    if done or time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.1)
                assert stored == len(acked), f"{len(acked) - stored} acked messages not stored"
                rows = await conn.fetch(
                    'SELECT role, count(*) AS n, count(DISTINCT (conversation_id, "offset")) AS k, '
                    "count(DISTINCT id) AS ids FROM messages GROUP BY role"
                )
                by_role = {r["role"]: r for r in rows}
                assert by_role["user"]["n"] == len(acked)
                assert by_role["assistant"]["n"] == len(acked)  # one reply each
                for r in rows:
                    assert r["n"] == r["k"] == r["ids"]  # no duplicates
                charged = await conn.fetchval("SELECT count(DISTINCT user_id) FROM usage")
                assert charged == 3
                assert await ready() == 200
            finally:
                await conn.close()
    finally:
        stop.set()
        await asyncio.to_thread(postgres_server.start)
        server.close()
