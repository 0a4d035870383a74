"""What a WebSocket upgrade needs around the connection itself: the subprotocols offered,
the admission place an unauthenticated socket holds, and a bound on the kernel's send
buffer."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable

from aiohttp import web


def offered_subprotocols(request: web.Request) -> list[str]:
    header = request.headers.get("Sec-WebSocket-Protocol", "")
    return [p.strip() for p in header.split(",") if p.strip()]


def authenticated(unauthenticated: list[Callable[[], None]]) -> None:
    """The socket's authentication is over: its admission place is released, once."""
    if unauthenticated:
        unauthenticated.pop()()


def bound_kernel_buffer(transport: asyncio.BaseTransport, size: int) -> None:
    """Cap the kernel's send buffer: autotuning lets one stalled peer pin megabytes."""
    sock = transport.get_extra_info("socket")
    if size and sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
