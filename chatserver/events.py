"""Fan-out events: one server frame for a conversation, framed once per encoding.

Server-to-client WebSocket frames are unmasked and we never compress, so one framed
bytes object serves every recipient using the same encoding.
"""

from __future__ import annotations

import struct
from typing import Any

from protocol import Encoding, encode

_TEXT_OP = 0x81  # FIN + text
_BINARY_OP = 0x82  # FIN + binary


def ws_frame(payload: bytes, binary: bool) -> bytes:
    """A whole, unmasked, uncompressed WebSocket data frame."""
    op = _BINARY_OP if binary else _TEXT_OP
    size = len(payload)
    if size < 126:
        header = bytes((op, size))
    elif size < 65536:
        header = struct.pack("!BBH", op, 126, size)
    else:
        header = struct.pack("!BBQ", op, 127, size)
    return header + payload


def framed(frame: dict[str, Any], encoding: Encoding) -> bytes:
    return ws_frame(encode(frame, encoding), encoding.binary)


class Event:
    """A frame fanned out to a conversation's members, with what filters need to know."""

    __slots__ = (
        "_binary",
        "_text",
        "conversation_id",
        "exclude_user",
        "frame",
        "generation_id",
        "offset",
        "published_at",
        "seq",
    )

    def __init__(self, conversation_id: str, frame: dict[str, Any], published_at: float = 0.0):
        self.conversation_id = conversation_id
        self.frame = frame
        self.published_at = published_at
        kind = frame.get("type")
        self.offset = 0
        self.seq = 0
        self.generation_id: str | None = None
        self.exclude_user: str | None = None
        if kind == "message":
            self.offset = int(frame["message"]["offset"])
        elif kind == "delta":
            self.seq = int(frame["seq"])
            self.generation_id = str(frame["generation_id"])
        elif kind == "gen_end" and isinstance(frame.get("message"), dict):
            # A join whose window already held the stored reply must not get it twice.
            self.offset = int(frame["message"]["offset"])
        elif kind == "gen_start":
            # seq 0: dropped for a client whose join snapshot already covers this reply
            self.generation_id = str(frame["generation_id"])
        elif kind == "typing":
            self.exclude_user = str(frame["user_id"])
        self._text: bytes | None = None
        self._binary: bytes | None = None

    def framed(self, binary: bool) -> bytes:
        if binary:
            if self._binary is None:
                self._binary = framed(self.frame, Encoding.MSGPACK)
            return self._binary
        if self._text is None:
            self._text = framed(self.frame, Encoding.JSON)
        return self._text
