"""The per-connection outbound buffer and the hub-wide flusher, on real socket transports.

A socketpair gives a real transport (kernel buffers, the loop's own write path); the only
stand-in is a thin recorder in front of it that counts write calls, since how many frames
share one write is the point of the flusher.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Iterable
from typing import Any, cast

import pytest

from chatserver.fanout.outbound import Flusher, Outbound


class _Recording:
    """Forwards to a real transport and remembers each write call's frames."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self.real = transport
        self.writes: list[list[bytes]] = []

    def write(self, data: bytes) -> None:
        self.writes.append([data])
        self.real.write(data)

    def writelines(self, frames: Iterable[bytes]) -> None:
        frames = list(frames)
        self.writes.append(frames)
        self.real.writelines(frames)

    def get_write_buffer_size(self) -> int:
        return self.real.get_write_buffer_size()

    def is_closing(self) -> bool:
        return self.real.is_closing()


class _Owner:
    def __init__(self) -> None:
        self.overflows = 0

    def on_overflow(self) -> None:
        self.overflows += 1


@pytest.fixture
async def pair() -> AsyncIterator[tuple[_Recording, socket.socket]]:
    ours, peer = socket.socketpair()
    loop = asyncio.get_running_loop()
    transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, ours)
    peer.setblocking(False)
    try:
        yield _Recording(transport), peer
    finally:
        transport.abort()
        peer.close()


def _outbound(recording: _Recording, flusher: Flusher, limit: int, owner: _Owner) -> Outbound:
    return Outbound(cast(Any, recording), flusher, limit, owner)


async def _passes(count: int) -> None:
    for _ in range(count):
        await asyncio.sleep(0)


async def _read(peer: socket.socket, size: int) -> bytes:
    loop = asyncio.get_running_loop()
    data = b""
    while len(data) < size:
        data += await loop.sock_recv(peer, size - len(data))
    return data


async def test_frames_of_consecutive_passes_share_one_write(
    pair: tuple[_Recording, socket.socket],
) -> None:
    recording, peer = pair
    flusher = Flusher(passes=2)
    out = _outbound(recording, flusher, 1 << 20, _Owner())
    loop = asyncio.get_running_loop()
    out.push(b"one")
    # The next pass: the way a task woken by the same I/O poll adds its frame.
    loop.call_soon(out.push, b"two")
    await _passes(4)
    assert recording.writes == [[b"one", b"two"]]
    assert out.frames is None and out.buffered_bytes() == 0
    assert await _read(peer, 6) == b"onetwo"


async def test_flush_now_writes_at_once_and_the_round_writes_what_comes_after(
    pair: tuple[_Recording, socket.socket],
) -> None:
    recording, peer = pair
    flusher = Flusher(passes=2)
    a = _outbound(recording, flusher, 1 << 20, _Owner())
    b = _outbound(recording, flusher, 1 << 20, _Owner())
    a.push(b"a1")
    a.push(b"a2")
    b.push(b"b1")
    flusher.flush_now()  # no pass has run: both written in this very call, in order
    assert recording.writes == [[b"a1", b"a2"], [b"b1"]]
    a.push(b"a3")  # after the early flush: the round scheduled before it takes this one
    await _passes(3)
    assert recording.writes == [[b"a1", b"a2"], [b"b1"], [b"a3"]]
    flusher.flush_now()  # nothing dirty: nothing written
    assert len(recording.writes) == 3
    assert await _read(peer, 8) == b"a1a2b1a3"


async def test_an_idle_loop_flushes_within_its_passes(
    pair: tuple[_Recording, socket.socket],
) -> None:
    recording, peer = pair
    for passes in (1, 2, 3):
        flusher = Flusher(passes=passes)
        out = _outbound(recording, flusher, 1 << 20, _Owner())
        out.push(b"x")
        await _passes(passes)
        assert out.frames is None, f"not written after {passes} passes"
    assert await _read(peer, 3) == b"xxx"


async def test_queued_bytes_past_the_limit_overflow_once(
    pair: tuple[_Recording, socket.socket],
) -> None:
    recording, _ = pair
    owner = _Owner()
    out = _outbound(recording, Flusher(), 10, owner)
    assert out.push(b"12345")
    assert out.buffered_bytes() == 5
    assert not out.push(b"678901")  # 11 bytes queued > 10
    assert owner.overflows == 1 and out.closed and out.frames is None
    assert not out.push(b"x")  # closed: refused without a second close
    assert owner.overflows == 1
    await _passes(3)
    assert recording.writes == []  # nothing of an overflowed round is written


async def test_the_transport_backlog_counts_against_the_limit(
    pair: tuple[_Recording, socket.socket],
) -> None:
    recording, _ = pair
    # The peer reads nothing: fill the kernel buffers until the transport holds a backlog.
    chunk = b"\0" * 65536
    while recording.get_write_buffer_size() == 0:
        recording.real.write(chunk)
    backlog = recording.get_write_buffer_size()
    owner = _Owner()
    out = _outbound(recording, Flusher(), backlog + 100, owner)
    assert out.push(b"a" * 50)  # backlog + 50 fits
    assert out.buffered_bytes() == backlog + 50
    assert not out.push(b"b" * 60)  # backlog + 110 does not
    assert owner.overflows == 1


async def test_stop_writes_what_is_queued_and_refuses_after(
    pair: tuple[_Recording, socket.socket],
) -> None:
    recording, peer = pair
    out = _outbound(recording, Flusher(), 1 << 20, _Owner())
    out.push(b"last")
    out.stop()
    assert recording.writes == [[b"last"]]
    assert not out.push(b"late")
    await _passes(3)
    assert recording.writes == [[b"last"]]  # the flusher's round finds nothing left
    assert await _read(peer, 4) == b"last"
