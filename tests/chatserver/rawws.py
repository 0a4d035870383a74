"""A bare-socket WebSocket client for tests that need control below any library:
a tiny receive buffer, and nothing reads the socket unless the test asks."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import struct


class RawWebSocket:
    def __init__(self, sock: socket.socket, leftover: bytes) -> None:
        self.sock = sock
        self._buffer = bytearray(leftover)
        self._loop = asyncio.get_running_loop()

    @classmethod
    async def connect(
        cls, host: str, port: int, token: str, rcvbuf: int = 4096, protocol: str = "chat.v1.json"
    ) -> RawWebSocket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # A small receive window: a client that stops reading stalls the server quickly.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, (host, port))
        key = base64.b64encode(os.urandom(16)).decode()
        await loop.sock_sendall(
            sock,
            (
                f"GET /ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: {protocol}\r\n"
                f"Authorization: Bearer {token}\r\n\r\n"
            ).encode(),
        )
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 4096), 10)
            if not chunk:
                raise ConnectionError(f"handshake: connection closed after {head!r}")
            head += chunk
        status, _, rest = head.partition(b"\r\n\r\n")
        if b" 101 " not in status.split(b"\r\n", 1)[0]:
            raise ConnectionError(f"handshake refused: {status!r}")
        return cls(sock, rest)

    async def send_frame(self, opcode: int, payload: bytes) -> None:
        """One masked frame, as a client must send it (0x1 text, 0x2 binary)."""
        mask = os.urandom(4)
        size = len(payload)
        first = 0x80 | opcode
        if size < 126:
            header = struct.pack("!BB", first, 0x80 | size)
        elif size < 65536:
            header = struct.pack("!BBH", first, 0x80 | 126, size)
        else:
            header = struct.pack("!BBQ", first, 0x80 | 127, size)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        await self._loop.sock_sendall(self.sock, header + mask + masked)

    async def send_text(self, text: str) -> None:
        await self.send_frame(0x1, text.encode())

    async def _read_exactly(self, size: int, timeout: float) -> bytes:
        while len(self._buffer) < size:
            chunk = await asyncio.wait_for(self._loop.sock_recv(self.sock, 65536), timeout)
            if not chunk:
                raise ConnectionError("connection closed")
            self._buffer += chunk
        out = bytes(self._buffer[:size])
        del self._buffer[:size]
        return out

    async def read_frame(self, timeout: float = 10.0) -> tuple[int, bytes]:
        """(opcode, payload) of the next server frame."""
        head = await self._read_exactly(2, timeout)
        opcode = head[0] & 0x0F
        size = head[1] & 0x7F
        if size == 126:
            (size,) = struct.unpack("!H", await self._read_exactly(2, timeout))
        elif size == 127:
            (size,) = struct.unpack("!Q", await self._read_exactly(8, timeout))
        return opcode, await self._read_exactly(size, timeout)

    async def read_until_close(self, timeout: float = 30.0) -> tuple[int, int]:
        """Read everything; return (data frames seen, close code)."""
        frames = 0
        while True:
            opcode, payload = await self.read_frame(timeout)
            if opcode == 0x8:
                return frames, struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
            frames += 1

    def close(self) -> None:
        self.sock.close()
