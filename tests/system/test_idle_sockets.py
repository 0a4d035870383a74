"""Sockets on the direct port that never finish a request are closed (CHAT_HTTP_IDLE_TIMEOUT_S).

aiohttp arms its keep-alive timer when a connection is made; it used to be an hour, so a
socket that sent nothing, or half an upgrade request, held a file descriptor all that time.
A real ``chatserver serve`` process: the timer is the AppRunner's, set in the CLI.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

import pytest

from tests.serverproc import ServerProc

IDLE_S = 1.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    proc = ServerProc(
        tmp_path_factory.mktemp("idle"), env={"CHAT_HTTP_IDLE_TIMEOUT_S": str(IDLE_S)}
    )
    proc.start()
    yield proc
    proc.close()


async def _seconds_until_eof(server: ServerProc, send: bytes) -> float:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, ("127.0.0.1", server.port))
        started = loop.time()
        if send:
            await loop.sock_sendall(sock, send)
        # EOF (or a reset) is the server closing; a timeout here means it never did.
        while True:
            try:
                chunk = await asyncio.wait_for(loop.sock_recv(sock, 4096), 10 * IDLE_S)
            except ConnectionResetError:
                break
            if not chunk:
                break
        return loop.time() - started
    finally:
        sock.close()


@pytest.mark.parametrize(
    "send",
    [
        b"",
        b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n",
    ],
    ids=["silent", "half-upgrade"],
)
async def test_a_socket_that_never_finishes_a_request_is_closed(
    server: ServerProc, send: bytes
) -> None:
    waited = await _seconds_until_eof(server, send)
    assert waited >= IDLE_S * 0.9, waited  # not at once: the setting's timer closed it
