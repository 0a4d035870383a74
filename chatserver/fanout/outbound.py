"""Per-connection outbound buffer written below aiohttp's writer, once per flush round.

Every frame for a connection (direct replies and fan-out) goes through here, so order is
kept. A hub-wide ``Flusher`` writes each dirty connection's frames with one
``transport.writelines`` per round of a few loop passes. Because this bypasses aiohttp's
flow control the buffer enforces its own bound: queued bytes plus the transport's buffer
above ``limit_bytes`` marks the connection as a slow consumer.
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
        frames = self.frames
        if frames is None:
            # ``queued`` starts from the transport's backlog, read once per round: it cannot
            # grow before our next write (aiohttp's own pings and pongs aside, a few bytes),
            # so one C call per connection and round, not per frame (fan-out hot path).
            self.queued = self.transport.get_write_buffer_size() + len(data)
            if self.queued > self.limit:
                self.overflow()
                return False
            self.frames = [data]
            self._flusher.mark(self)
            return True
        self.queued += len(data)
        if self.queued > self.limit:
            self.overflow()
            return False
        frames.append(data)
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

    def detach(self) -> None:
        """The connection is over: refuse frames and forget the owner, which holds this
        buffer (a cycle per connection otherwise, freed only by a full collection)."""
        self.closed = True
        self.frames = None
        self._owner = _DETACHED

    def buffered_bytes(self) -> int:
        """Bytes not yet accepted by the kernel (while a round is queued: as of its start)."""
        if self.frames is not None or self.transport.is_closing():
            return self.queued
        return self.transport.get_write_buffer_size()


class _Detached:
    __slots__ = ()

    def on_overflow(self) -> None:
        return None


_DETACHED = _Detached()


class Flusher:
    """Coalesces the writes of a few event-loop passes into one write per connection.

    A write syscall costs more than the frames it carries (~10 µs here against ~1 µs of
    Python per frame), so frames per write is what fan-out CPU comes down to. The first
    mark of a round schedules a callback that re-schedules itself ``passes - 1`` times
    before it flushes: the callbacks the loop already had ready (the tasks woken by the same
    I/O poll: other sends, the broker's subscriber) run in between and add their frames to
    the same writes. With nothing else ready the passes follow each other at once (a few
    µs), so an idle server adds no latency; a busy one waits at most that many passes.
    """

    __slots__ = ("_dirty", "_left", "_loop", "_scheduled", "passes")

    def __init__(self, passes: int = 2) -> None:
        self._dirty: list[Outbound] = []
        self._scheduled = False
        self._left = 0
        self.passes = passes
        self._loop: asyncio.AbstractEventLoop | None = None

    def mark(self, outbound: Outbound) -> None:
        self._dirty.append(outbound)
        if not self._scheduled:
            self._scheduled = True
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
            self._left = self.passes - 1
            self._loop.call_soon(self._pass)

    def _pass(self) -> None:
        if self._left > 0:
            self._left -= 1
            assert self._loop is not None
            self._loop.call_soon(self._pass)
            return
        self._flush()

    def _flush(self) -> None:
        self._scheduled = False
        self.flush_now()

    def flush_now(self) -> None:
        """Write every dirty connection at once, without waiting for the round's passes.

        For a batch that cannot coalesce further: a loop tick's deltas go one per streaming
        connection, so waiting two more passes only delays them (on a busy loop a pass is
        the whole of its I/O). Whatever else is queued by then (a fan-out of the same pass)
        leaves with them, a little less coalesced. The round already scheduled stays
        scheduled and writes what is queued after this.
        """
        dirty = self._dirty
        if dirty:
            self._dirty = []
            for outbound in dirty:
                outbound.write_now()
