"""Per-connection outbound buffer written below aiohttp's writer, once per loop tick.

Every frame for a connection (direct replies and fan-out) goes through here, so order is
kept. A hub-wide ``Flusher`` writes each dirty connection's frames with one
``transport.writelines`` per tick. Because this bypasses aiohttp's flow control the
buffer enforces its own bound: queued bytes plus the transport's buffer above
``limit_bytes`` marks the connection as a slow consumer.
"""

from __future__ import annotations

import asyncio
from typing import Protocol


class OverflowHandler(Protocol):
    def on_overflow(self) -> None:
        """The connection fell behind past its bound: close it (4408)."""


class Outbound:
    __slots__ = ("_flusher", "_owner", "closed", "frames", "limit", "queued", "transport")

    def __init__(
        self,
        transport: asyncio.Transport,
        flusher: Flusher,
        limit_bytes: int,
        owner: OverflowHandler,
    ) -> None:
        self.transport = transport
        self._flusher = flusher
        self.limit = limit_bytes
        # The owner, not a bound method of it: one object fewer per open connection.
        self._owner = owner
        self.frames: list[bytes] | None = None  # a list only while something is queued
        self.queued = 0
        self.closed = False

    def push(self, data: bytes) -> bool:
        """Queue one framed message; False when the connection is closed or overflowed."""
        if self.closed:
            return False
        self.queued += len(data)
        if self.queued + self.transport.get_write_buffer_size() > self.limit:
            self.overflow()
            return False
        if self.frames is None:
            self.frames = [data]
            self._flusher.mark(self)
        else:
            self.frames.append(data)
        return True

    def overflow(self) -> None:
        self.closed = True
        self.frames = None
        self.queued = 0
        self._owner.on_overflow()

    def write_now(self) -> None:
        """Write what is queued; called by the flusher or before a close frame."""
        frames = self.frames
        if not frames:
            return
        self.frames = None
        self.queued = 0
        if self.closed or self.transport.is_closing():
            return
        if len(frames) == 1:
            self.transport.write(frames[0])
        else:
            self.transport.writelines(frames)

    def stop(self) -> None:
        """Flush what is queued and refuse anything after (the close frame follows)."""
        if not self.closed:
            self.write_now()
        self.closed = True
        self.frames = None

    def buffered_bytes(self) -> int:
        if self.transport.is_closing():
            return self.queued
        return self.queued + self.transport.get_write_buffer_size()


class Flusher:
    """Coalesces all writes of one event-loop tick into one write per connection."""

    __slots__ = ("_dirty", "_loop", "_scheduled")

    def __init__(self) -> None:
        self._dirty: list[Outbound] = []
        self._scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None

    def mark(self, outbound: Outbound) -> None:
        self._dirty.append(outbound)
        if not self._scheduled:
            self._scheduled = True
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        dirty = self._dirty
        self._dirty = []
        self._scheduled = False
        for outbound in dirty:
            outbound.write_now()
