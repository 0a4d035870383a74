"""A lean WebSocket client on a raw asyncio protocol: just enough of RFC 6455 for a harness.

An aiohttp client spends most of a core at ~110-150k frames/s here; this one parses frame
headers straight out of each ``data_received`` chunk (server frames are unmasked), hands every
data frame's payload with one timestamp per read to a callback, answers pings, and records
the close code. Client frames carry an all-zero masking key: legal (the server unmasks with
whatever key it is given), and it saves masking the payload in Python. A browser must use a
random key; a load harness that talks only to servers under test need not.
"""

from __future__ import annotations

import asyncio
import base64
import os
import struct
import time
from collections.abc import Callable
from typing import cast

OP_CONT = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

_ZERO_MASK = b"\x00\x00\x00\x00"
_MAX_HANDSHAKE = 16 * 1024

OnPayload = Callable[[bytes, int, int], None]  # (payload, opcode, monotonic ns of the read)
OnClose = Callable[[int | None], None]


MakeProtocol = Callable[[bytes, OnPayload, OnClose], "WsProtocol"]


class HandshakeError(ConnectionError):
    """The server refused the upgrade or closed before answering it."""


def frame_header(opcode: int, size: int) -> bytes:
    """The header of one whole masked client frame (FIN set, zero masking key)."""
    first = 0x80 | opcode
    if size < 126:
        return bytes((first, 0x80 | size)) + _ZERO_MASK
    if size < 65536:
        return struct.pack("!BBH", first, 0x80 | 126, size) + _ZERO_MASK
    return struct.pack("!BBQ", first, 0x80 | 127, size) + _ZERO_MASK


def upgrade_request(host: str, port: int, path: str, headers: dict[str, str]) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host}:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
        *(f"{name}: {value}" for name, value in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class WsProtocol(asyncio.Protocol):
    """One client connection. ``opened`` resolves once the server answered 101."""

    def __init__(self, request: bytes, on_payload: OnPayload, on_close: OnClose) -> None:
        self._request = request
        self._on_payload = on_payload
        self._on_close = on_close
        self.transport: asyncio.Transport | None = None
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._head = b""
        self._upgraded = False
        self._rest = b""
        self._fragments: list[bytes] = []
        self._fragment_op = 0
        self.close_code: int | None = None
        self.closed = False
        self.bytes_in = 0

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        self.transport.write(self._request)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.opened.done():
            self.opened.set_exception(
                HandshakeError(f"connection closed during the handshake: {self._head[:200]!r}")
            )
        self._on_close(self.close_code)

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        if not self._upgraded:
            data = self._handshake(data)
            if not data:
                return
        if self._rest:
            data = self._rest + data
            self._rest = b""
        now = time.monotonic_ns()
        size_all = len(data)
        pos = 0
        while size_all - pos >= 2:
            first = data[pos]
            size = data[pos + 1] & 0x7F
            start = pos + 2
            if size == 126:
                if size_all - pos < 4:
                    break
                size = (data[pos + 2] << 8) | data[pos + 3]
                start = pos + 4
            elif size == 127:
                if size_all - pos < 10:
                    break
                size = int.from_bytes(data[pos + 2 : pos + 10], "big")
                start = pos + 10
            end = start + size
            if end > size_all:
                break
            pos = end
            self._frame(first, data[start:end], now)
        if pos < size_all:
            self._rest = data[pos:]

    # -- internals -------------------------------------------------------------------------

    def _handshake(self, data: bytes) -> bytes:
        self._head += data
        head, sep, rest = self._head.partition(b"\r\n\r\n")
        if not sep:
            if len(self._head) > _MAX_HANDSHAKE:
                self._fail(HandshakeError("handshake answer too long"))
            return b""
        status = head.split(b"\r\n", 1)[0]
        if b" 101 " not in status + b" ":
            self._fail(HandshakeError(f"upgrade refused: {status.decode(errors='replace')}"))
            return b""
        self._upgraded = True
        self._head = b""
        if not self.opened.done():
            self.opened.set_result(None)
        return rest

    def _fail(self, exc: Exception) -> None:
        if not self.opened.done():
            self.opened.set_exception(exc)
        if self.transport is not None:
            self.transport.close()

    def _frame(self, first: int, payload: bytes, now: int) -> None:
        """One whole frame (``first``: its first header byte)."""
        opcode = first & 0x0F
        if first & 0x80 and (opcode == OP_TEXT or opcode == OP_BINARY):  # noqa: SIM109 (hot)
            self._on_payload(payload, opcode, now)
        else:
            self._control(first, opcode, payload, now)

    def _control(self, first: int, opcode: int, payload: bytes, now: int) -> None:
        if opcode == OP_PING:
            self.send(OP_PONG, payload)
        elif opcode == OP_CLOSE:
            self.close_code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
            if not self.closed and self.transport is not None:
                self.send(OP_CLOSE, payload[:2])
                self.transport.close()
        elif opcode in (OP_TEXT, OP_BINARY):  # the first fragment of a fragmented message
            self._fragment_op = opcode
            self._fragments = [payload]
        elif opcode == OP_CONT and self._fragments:
            self._fragments.append(payload)
            if first & 0x80:
                whole = b"".join(self._fragments)
                self._fragments = []
                self._on_payload(whole, self._fragment_op, now)

    # -- sending ---------------------------------------------------------------------------

    def send(self, opcode: int, payload: bytes) -> bool:
        transport = self.transport
        if transport is None or self.closed or transport.is_closing():
            return False
        transport.write(frame_header(opcode, len(payload)) + payload)
        return True

    def write_buffer_size(self) -> int:
        transport = self.transport
        return transport.get_write_buffer_size() if transport is not None else 0

    def close(self, code: int = 1000) -> None:
        """Send a close frame and drop the connection (the harness does not linger)."""
        if self.transport is not None and not self.transport.is_closing():
            self.send(OP_CLOSE, struct.pack("!H", code))
            self.transport.close()


async def open_ws(
    host: str,
    port: int,
    path: str,
    headers: dict[str, str],
    on_payload: OnPayload,
    on_close: OnClose,
    timeout: float = 10.0,
    on_protocol: Callable[[WsProtocol], None] | None = None,
    make: MakeProtocol | None = None,
) -> WsProtocol:
    """Connect and upgrade; raises ``OSError``/``HandshakeError``/``TimeoutError``.

    ``on_protocol`` gets the protocol as soon as it exists: frames may arrive (and need an
    answer) in the same read as the 101, before this returns. ``make`` builds the protocol
    (default ``WsProtocol``; the harness's is ``receive.CountingProtocol``).
    """
    loop = asyncio.get_running_loop()
    request = upgrade_request(host, port, path, headers)

    def factory() -> WsProtocol:
        protocol = (make or WsProtocol)(request, on_payload, on_close)
        if on_protocol is not None:
            on_protocol(protocol)
        return protocol

    _, protocol = await asyncio.wait_for(loop.create_connection(factory, host, port), timeout)
    try:
        await asyncio.wait_for(asyncio.shield(protocol.opened), timeout)
    except BaseException:
        if protocol.transport is not None:
            protocol.transport.abort()
        raise
    return protocol
