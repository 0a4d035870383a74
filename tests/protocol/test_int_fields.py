"""Integer fields: what both encodings carry, so a frame read from JSON can be sent again
as MessagePack (JSON itself has no bound)."""

from __future__ import annotations

import json

import pytest

from protocol import DEFAULT_LIMITS
from protocol.codec import Encoding, decode_server_frame, encode_frame
from protocol.errors import ProtocolError


def _hello(heartbeat_s: int) -> str:
    return json.dumps(
        {"type": "hello", "session_id": "s", "user_id": "u", "server_id": "x",
         "heartbeat_s": heartbeat_s, "max_frame_bytes": 1, "protocol": 1}
    )  # fmt: skip


@pytest.mark.parametrize("heartbeat_s", [2**64, 2**70])
def test_an_integer_msgpack_cannot_carry_is_refused(heartbeat_s: int) -> None:
    with pytest.raises(ProtocolError, match="heartbeat_s"):
        decode_server_frame(_hello(heartbeat_s), Encoding.JSON, DEFAULT_LIMITS)


def test_the_largest_it_carries_goes_both_ways() -> None:
    frame = decode_server_frame(_hello(2**64 - 1), Encoding.JSON, DEFAULT_LIMITS)
    again = encode_frame(frame, Encoding.MSGPACK)
    assert decode_server_frame(again, Encoding.MSGPACK, DEFAULT_LIMITS) == frame
