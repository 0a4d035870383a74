"""Integer fields: what both encodings carry, so a frame read from JSON can be sent again
as MessagePack (JSON itself has no bound)."""

from __future__ import annotations

import json

import pytest

from protocol import DEFAULT_LIMITS, ErrorCode, Ping
from protocol.codec import Encoding, decode_client_frame, decode_server_frame, encode_frame
from protocol.errors import ProtocolError


def _hello(heartbeat_s: int) -> str:
    return json.dumps(
        {"type": "hello", "session_id": "s", "user_id": "u", "server_id": "x",
         "heartbeat_s": heartbeat_s, "max_frame_bytes": 1, "protocol": 1}
    )  # fmt: skip


@pytest.mark.parametrize("heartbeat_s", [2**64, 2**70, -(2**63) - 1])
def test_an_integer_msgpack_cannot_carry_is_refused(heartbeat_s: int) -> None:
    # JSON reads it as a float: the error still names what is wrong with it.
    with pytest.raises(ProtocolError, match="'heartbeat_s' must be an integer MessagePack can"):
        decode_server_frame(_hello(heartbeat_s), Encoding.JSON, DEFAULT_LIMITS)


@pytest.mark.parametrize("ts", [str(2**64), str(10**30), "-" + str(2**63 + 1), "1e19"])
def test_a_ping_ts_past_64_bits_is_refused_not_echoed_changed(ts: str) -> None:
    with pytest.raises(ProtocolError, match="'ts' must be a 64-bit number") as caught:
        decode_client_frame('{"type":"ping","ts":' + ts + "}", Encoding.JSON, DEFAULT_LIMITS)
    assert caught.value.code is ErrorCode.BAD_FRAME


def test_a_float_ts_within_64_bits_is_echoed() -> None:
    frame = decode_client_frame('{"type":"ping","ts":1.5e18}', Encoding.JSON, DEFAULT_LIMITS)
    assert isinstance(frame, Ping) and frame.ts == 1.5e18


def test_the_largest_it_carries_goes_both_ways() -> None:
    frame = decode_server_frame(_hello(2**64 - 1), Encoding.JSON, DEFAULT_LIMITS)
    again = encode_frame(frame, Encoding.MSGPACK)
    assert decode_server_frame(again, Encoding.MSGPACK, DEFAULT_LIMITS) == frame
