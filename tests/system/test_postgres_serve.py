"""`chatserver migrate` and `chatserver serve` on Postgres as real processes, also through
PgBouncer in transaction mode."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import asyncpg  # type: ignore[import-untyped]
import pytest

from chatclient.client import ChatApi, ChatClient
from tests.serverproc import REPO_ROOT, ServerProc, ServerProcError
from tests.services import PgBouncer

# The tests' tokens come from /api/dev/token: with Postgres, dev auth mode must be allowed.
DEV_AUTH = {"CHAT_ALLOW_DEV_AUTH": "yes"}


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHAT_")}
    return subprocess.run(
        [sys.executable, "-m", "chatserver", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def _stored(dsn: str, ids: list[str], timeout_s: float = 15) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            n = int(
                await conn.fetchval("SELECT count(*) FROM messages WHERE id = ANY($1::text[])", ids)
            )
            if n == len(ids) or time.monotonic() > deadline:
                return n
            await asyncio.sleep(0.05)
    finally:
        await conn.close()


async def test_serve_needs_the_schema_and_migrate_provides_it(
    tmp_path: Path, postgres_dsn: str
) -> None:
    unmigrated = ServerProc(tmp_path, env=DEV_AUTH, args=["--database-url", postgres_dsn])
    with pytest.raises(ServerProcError, match="chatserver migrate"):
        unmigrated.start()
    unmigrated.close()

    done = _cli("migrate", "--database-url", postgres_dsn)
    assert done.returncode == 0, done.stderr
    assert "migrations applied: [1" in done.stdout
    done = _cli("partitions", "--database-url", postgres_dsn, "--retain-months", "12")
    assert done.returncode == 0, done.stderr
    assert "retention 12 months" in done.stdout

    with ServerProc(tmp_path, env=DEV_AUTH, args=["--database-url", postgres_dsn]) as server:
        async with aiohttp.ClientSession() as http:
            api = ChatApi(server.url, None, http)
            api.token = await api.dev_token("alice")
            conv = str((await api.create_conversation())["id"])
            async with await ChatClient.connect(server.ws_url, api.token, http=http) as client:
                await client.join(conv)
                ack = await client.send(conv, "stored in Postgres")
        assert await _stored(postgres_dsn, [ack.message_id]) == 1


async def test_serve_through_pgbouncer_in_transaction_mode(
    tmp_path: Path, pgbouncer_dsn: str, pgbouncer: PgBouncer, postgres_dsn: str
) -> None:
    args = ["--database-url", pgbouncer_dsn, "--pgbouncer", "yes", "--migrate", "yes"]
    env = {"CHAT_LOCAL_TTFT_MS": "1", "CHAT_LOCAL_TOKEN_MS": "0", **DEV_AUTH}
    with ServerProc(tmp_path, env=env, args=args) as server:
        async with aiohttp.ClientSession() as http:
            api = ChatApi(server.url, None, http)
            api.token = await api.dev_token("alice")
            conv = str((await api.create_conversation())["id"])
            ids: list[str] = []
            async with await ChatClient.connect(server.ws_url, api.token, http=http) as client:
                await client.join(conv)
                for i in range(10):
                    ack = await client.send_reliably(conv, f"message {i}")
                    reply = await client.reply(reply_to=ack.message_id, timeout=10)
                    assert reply.end is not None
                    ids.append(ack.message_id)
            status, body = await api.request("GET", "/api/conversations")
            assert status == 200 and [c["id"] for c in body["items"]] == [conv]
        # Stored through PgBouncer; checked directly on Postgres.
        assert await _stored(postgres_dsn, ids) == 10
