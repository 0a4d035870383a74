"""Limits across instances, and SIGTERM during a busy run (real processes)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sqlite3
import time
from pathlib import Path

import aiohttp
import pytest

from chatclient.client import ChatApi, ChatClient, ChatError, Closed
from protocol import ErrorCode, Reconnect
from tests.serverproc import ServerProc

from .scaleout import SECRET, connect, instances, token


async def test_limits_hold_across_instances(tmp_path: Path, redis_url: str) -> None:
    env = {"CHAT_LIMITS_FREE": "messages_per_minute=6,connections=2,daily_tokens=1000000"}
    with instances(tmp_path, redis_url, count=2, env=env) as (a, b):
        async with aiohttp.ClientSession() as http:
            api = ChatApi(a.url, token("alice"), http)
            conv = str((await api.create_conversation())["id"])
        on_a = await connect(a, "alice")
        on_b = await connect(b, "alice")
        try:
            # A third connection anywhere is one too many.
            for server in (a, b):
                with pytest.raises((ChatError, Closed)):
                    extra = await ChatClient.connect(server.ws_url, token("alice"))
                    await extra.close()
            accepted, refused = 0, []
            for i in range(12):  # spread over both instances: still 6 a minute in all
                client = on_a if i % 2 == 0 else on_b
                try:
                    await client.send(conv, f"m{i}")
                    accepted += 1
                except ChatError as exc:
                    refused.append(exc.frame)
            assert accepted == 6
            assert {f.code for f in refused} == {ErrorCode.RATE_LIMITED.value}
            assert all(f.retry_after_ms and f.retry_after_ms > 0 for f in refused)
        finally:
            await on_a.close()
            await on_b.close()


async def _busy_client(server: ServerProc, user: str, conv: str, acked: list[str]) -> bool:
    """Send until the server sends us away; True if we were told to reconnect."""
    client = await ChatClient.connect(server.ws_url, token(user))
    told = False
    try:
        await client.join(conv)
        i = 0
        while True:
            try:
                ack = await client.send(conv, f"{user} {i}", client_msg_id=f"{user}-{i}")
                acked.append(ack.message_id)
            except ChatError:
                pass  # refused while draining: not acked, so not owed
            except (TimeoutError, Closed, ConnectionError):
                break
            i += 1
            if any(isinstance(f, Reconnect) for f in client.pending()):
                told = True
        told = told or any(isinstance(f, Reconnect) for f in client.pending())
        # A send that timed out on a busy server may have left before its word came: read
        # on until the server closes the connection.
        with contextlib.suppress(Closed, TimeoutError, ConnectionError):
            while not told:
                told = isinstance(await client.next_frame(timeout=15), Reconnect)
    finally:
        with contextlib.suppress(Exception):
            await client.close()
    return told


async def test_sigterm_during_a_busy_run(tmp_path: Path) -> None:
    server = ServerProc(
        tmp_path,
        env={
            "CHAT_JWT_SECRET": SECRET,
            "CHAT_LOCAL_TTFT_MS": "5",
            "CHAT_LOCAL_TOKEN_MS": "5",
            "CHAT_SHUTDOWN_GRACE_S": "3",
            "CHAT_LIMITS_FREE": "messages_per_minute=100000,connections=1000,daily_tokens=1000000000",
            "CHAT_MAX_QUEUED_REPLIES": "1000",
        },
    )
    server.start()
    try:
        async with aiohttp.ClientSession() as http:
            users = [f"user{i}" for i in range(8)]
            api = ChatApi(server.url, token(users[0]), http)
            conv = str((await api.create_conversation(members=users[1:]))["id"])
        acked: list[str] = []
        clients = [asyncio.create_task(_busy_client(server, u, conv, acked)) for u in users]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while len(acked) < 100:  # busy: let traffic build up
            assert loop.time() < deadline
            await asyncio.sleep(0.01)
        assert server.proc is not None
        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        told = await asyncio.wait_for(asyncio.gather(*clients), 30)
        code = await asyncio.to_thread(server.proc.wait, 30)
        assert code == 0
        assert time.monotonic() - started < 3 + 10  # grace, then the clean-up
        assert all(told), f"{told.count(False)} clients were never told to reconnect"
    finally:
        server.close()
    with contextlib.closing(sqlite3.connect(server.sqlite_path)) as db:
        stored = [row[0] for row in db.execute("SELECT id FROM messages WHERE role = 'user'")]
    assert len(stored) == len(set(stored))
    assert set(acked) <= set(stored), f"{len(set(acked) - set(stored))} acked messages lost"
