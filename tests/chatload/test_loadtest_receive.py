"""The harness's counting read loop (``loadtest.receive``) counts exactly what the general
path counts: fresh, duplicated, reordered, misrouted and lost deliveries, latencies, and the
windows it reopens, over frames split anywhere across reads, in every dialect."""

from __future__ import annotations

import functools
import json
import struct
import time
from collections.abc import Callable
from typing import Any

import msgpack
import pytest

from chatload.accounting import Receiver, marker
from chatload.config import LoadConfig
from chatload.receive import CountingProtocol, Deliveries
from chatload.stats import bucket_of
from chatload.worker import Worker
from chatload.wsclient import OP_PING, OP_PONG, WsProtocol

NOW = 10**15  # every read happens "now"
DIALECTS = [("chatserver", False), ("chatserver", True), ("peer", False), ("socketio", False)]


class _Transport:
    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass


def _ws(payload: bytes, binary: bool) -> bytes:
    first = 0x82 if binary else 0x81
    if len(payload) < 126:
        return bytes((first, len(payload))) + payload
    return struct.pack("!BBH", first, 126, len(payload)) + payload


def _encoder(name: str, binary: bool) -> Callable[[dict[str, Any]], bytes]:
    def encode(frame: dict[str, Any]) -> bytes:
        if binary:
            return _ws(msgpack.packb(frame, use_bin_type=True), True)
        text = json.dumps(frame, separators=(",", ":"))
        if name == "socketio":
            text = f'42["frame",{text}]'
        return _ws(text.encode(), False)

    return encode


def _stream(name: str, binary: bool) -> bytes:
    encode = _encoder(name, binary)

    def message(sender: int, seq: int, latency_us: int, user: str = "u", pad: int = 60) -> bytes:
        tag = marker(sender, seq, NOW - latency_us * 1000)
        body = {"id": "m", "offset": seq, "user_id": user, "text": f"~L{tag} " + "x" * pad}
        return encode({"type": "message", "message": body})

    return b"".join(
        [
            encode({"type": "left", "conversation_id": "c"}),  # not a message: general path
            message(0, 1, 500),
            message(0, 2, 3_000),  # a log bucket
            message(0, 2, 7_000),  # duplicate
            message(2, 1, 10**7),
            message(0, 5, 12),  # 3 and 4 skipped
            bytes((0x80 | OP_PING, 2)) + b"hi",
            message(0, 3, 40),  # reordered: fresh
            message(0, 3, 41),  # duplicate of a reordered one
            message(2, 2, 90, user="a~b"),  # a "~" ahead of the marker: general path
            message(3, 1, 70),  # sender of conversation 1: counted there
            encode({"type": "message", "message": {"text": "no marker"}}),  # foreign
            message(2, 3, 2047, pad=0),  # short: a 7-bit length
            message(2, 3, 2048, pad=0),  # duplicate
        ]
    )


def _worker(name: str, binary: bool) -> Worker:
    config = LoadConfig(
        clients=6,
        members=3,
        procs=1,
        mode="chat",
        dialect=name,
        encoding="msgpack" if binary else "json",
    )
    worker = Worker(config.validate(), 0, emit=lambda event: None)
    worker.local_members[0] = 1  # client 1 is this worker's only member of conversation 0
    worker.clients[0].inflight = 5  # sender 0 has 5 messages in flight
    worker.flight.update((0 << 32) | seq for seq in range(1, 6))
    return worker


def _feed(worker: Worker, counting: bool, stream: bytes, piece: int) -> _Transport:
    client = worker.clients[1]
    on_payload = functools.partial(worker.on_payload, client)
    on_close = functools.partial(worker.on_close, client)
    proto: WsProtocol
    if counting:
        proto = CountingProtocol(
            b"GET",
            on_payload,
            on_close,
            deliveries=worker.deliveries,
            receiver=client.receiver,
            conv=client.conv,
        )
    else:
        proto = WsProtocol(b"GET", on_payload, on_close)
    transport = _Transport()
    proto.connection_made(transport)  # type: ignore[arg-type]
    data = b"HTTP/1.1 101 Switching Protocols\r\n\r\n" + stream
    for i in range(0, len(data), piece):
        proto.data_received(data[i : i + piece])
    return transport


def _state(worker: Worker) -> dict[str, Any]:
    tally = worker.tally
    worker.expected = {0: 8, 1: 1}  # acked: sender 0: 5, sender 2: 3; sender 3: 1
    counts = worker.report()["counts"]
    return {
        "delivered": dict(tally.delivered),
        "total": tally.delivered_total,
        "duplicated": tally.duplicated,
        "reordered": tally.reordered,
        "gaps": tally.gaps,
        "lost": counts["lost"],
        "foreign": worker.counts["foreign_messages"],
        "hist": worker.hist["delivery"].to_wire(),
        "inflight": worker.clients[0].inflight,
        "flight": sorted(worker.flight),
        "last_ns": max(worker.last_delivery_ns, worker.deliveries.last_ns),
    }


@pytest.mark.parametrize(("name", "binary"), DIALECTS)
@pytest.mark.parametrize("piece", [1, 2, 3, 7, 64, 1 << 20])
async def test_the_counting_loop_counts_what_the_general_path_counts(
    monkeypatch: pytest.MonkeyPatch, name: str, binary: bool, piece: int
) -> None:
    monkeypatch.setattr(time, "monotonic_ns", lambda: NOW)
    stream = _stream(name, binary)
    general, counting = _worker(name, binary), _worker(name, binary)
    _feed(general, False, stream, 1 << 20)
    general_path: list[bytes] = []
    count = Deliveries.count

    def counted(self: Deliveries, receiver: Receiver, tag: bytes, now: int) -> bool:
        general_path.append(tag)
        return count(self, receiver, tag, now)

    monkeypatch.setattr(Deliveries, "count", counted)
    transport = _feed(counting, True, stream, piece)
    assert len(general_path) == 1  # only the message with a "~" ahead of its marker
    expected = _state(general)
    assert _state(counting) == expected
    # and what both count is right
    assert expected["delivered"] == {0: 7, 1: 1}  # 0:1 0:2 2:1 0:5 0:3 2:2 2:3; 3:1
    assert (expected["duplicated"], expected["reordered"], expected["gaps"]) == (3, 1, 2)
    assert expected["lost"] == 1  # sender 0's message 4
    assert expected["foreign"] == 1
    latencies = [500, 3_000, 10**7, 12, 40, 90, 70, 2047]
    assert expected["hist"] == {
        str(b): latencies.count(us) for us in latencies for b in [bucket_of(us)]
    }
    assert expected["inflight"] == 1 and expected["flight"] == [4]  # the lost one holds
    assert expected["last_ns"] == NOW
    pong = transport.written[1]  # after the upgrade request
    assert pong[0] == 0x80 | OP_PONG and pong[-2:] == b"hi"


async def test_a_message_every_local_member_has_reopens_its_window_once() -> None:
    worker = _worker("chatserver", False)
    worker.local_members[0] = 2  # clients 1 and 2
    encode = _encoder("chatserver", False)
    tag = marker(0, 1, NOW)
    frame = encode({"type": "message", "message": {"text": f"~L{tag}"}})
    for index in (1, 2, 2):  # client 2 twice: the duplicate does not count
        client = worker.clients[index]
        proto = CountingProtocol(
            b"GET",
            functools.partial(worker.on_payload, client),
            functools.partial(worker.on_close, client),
            deliveries=worker.deliveries,
            receiver=client.receiver,
            conv=client.conv,
        )
        proto.connection_made(_Transport())  # type: ignore[arg-type]
        proto.data_received(b"HTTP/1.1 101 OK\r\n\r\n" + frame)
        if index == 1:
            assert worker.clients[0].inflight == 5  # one of two members has it
    assert worker.clients[0].inflight == 4
    assert 1 not in worker.flight
    assert worker.tally.delivered_total == 2 and worker.tally.duplicated == 1
    assert not worker.deliveries.cache or list(worker.deliveries.cache) == [tag.encode()]
