"""Helpers for multi-instance tests: several real servers on one Redis and one store."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

from chatclient.client import ChatClient, ChatError
from chatserver.auth import Authenticator
from protocol import Encoding, ErrorCode
from tests.serverproc import ServerProc

SECRET = "scale-out-test-secret-0123456789abcdef"
AUTH = Authenticator(SECRET)


def token(user: str) -> str:
    return AUTH.issue(user, ttl_s=3600)


@contextlib.contextmanager
def instances(
    tmp_path: Path,
    redis_url: str,
    count: int = 3,
    *,
    env: dict[str, str] | None = None,
    args: Sequence[str] = (),
    database_url: str | None = None,
    read_database_url: str | None = None,
) -> Iterator[list[ServerProc]]:
    """``count`` chatserver processes sharing Redis and a store: Postgres when
    ``database_url`` is given (migrated by whoever starts first), else one SQLite file."""
    store = tmp_path / "shared.sqlite3"
    if database_url is not None:
        args = [*args, "--database-url", database_url, "--migrate", "yes"]
        if read_database_url is not None:
            args = [*args, "--read-database-url", read_database_url]
    base = {
        "CHAT_JWT_SECRET": SECRET,
        "CHAT_LOCAL_TTFT_MS": "5",
        "CHAT_LOCAL_TOKEN_MS": "5",
        "CHAT_REPLY_LEASE_S": "2",
        "CHAT_LOG_LEVEL": "warning",
        "CHAT_LIMITS_FREE": "messages_per_minute=100000,connections=1000,daily_tokens=1000000000",
        **(env or {}),
    }
    servers: list[ServerProc] = []
    try:
        for index in range(count):
            server = ServerProc(
                tmp_path / f"instance-{index}",
                env={**base, "CHAT_SERVER_ID": f"instance-{index}"},
                args=["--redis-url", redis_url, *args],
                sqlite_path=store,
            )
            servers.append(server.start())
        yield servers
    finally:
        for server in servers:
            server.close()


async def connect(server: ServerProc, user: str, encoding: Encoding = Encoding.JSON) -> ChatClient:
    return await ChatClient.connect(server.ws_url, token(user), encoding=encoding)


async def connect_when_ready(server: ServerProc, user: str, timeout: float = 30.0) -> ChatClient:
    """``connect``, as a client told ``unavailable`` (Redis still coming back) does: again
    after ``retry_after_ms``, until ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            return await connect(server, user)
        except ChatError as exc:
            if exc.frame.code != ErrorCode.UNAVAILABLE or loop.time() > deadline:
                raise
            await asyncio.sleep((exc.frame.retry_after_ms or 1000) / 1000)
