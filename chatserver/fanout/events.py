"""Fan-out events: one server frame for a conversation, framed once per encoding.

Server-to-client WebSocket frames are unmasked and we never compress, so one framed
bytes object serves every recipient using the same encoding.
"""

from __future__ import annotations

import struct
from json.encoder import encode_basestring
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


class DeltaTemplate:
    """One reply's ``delta`` frames in JSON: all but ``seq`` and ``text`` encoded once.

    A reply streams hundreds of deltas that differ only in those two fields; encoding the
    whole frame each time was most of a delta's cost. ``encode_basestring`` is the escaping
    the JSON encoder itself uses for ``ensure_ascii=False``, and the keys come in the order
    of ``protocol.Delta.to_dict``, so the bytes are the encoder's own (a test holds them
    equal, escapes and non-BMP text included). A lone surrogate fails the same way too:
    ``UnicodeEncodeError`` at the UTF-8 step.
    """

    __slots__ = ("_head", "conversation_id", "generation_id")

    def __init__(self, conversation_id: str, generation_id: str) -> None:
        self.conversation_id = conversation_id
        self.generation_id = generation_id
        self._head = (
            '{"type":"delta","conversation_id":'
            + encode_basestring(conversation_id)
            + ',"generation_id":'
            + encode_basestring(generation_id)
            + ',"seq":'
        )

    def frame(self, seq: int, text: str) -> dict[str, Any]:
        """The frame as a mapping (MessagePack members, other instances through the broker)."""
        return {
            "type": "delta",
            "conversation_id": self.conversation_id,
            "generation_id": self.generation_id,
            "seq": seq,
            "text": text,
        }

    def json(self, seq: int, text: str) -> bytes:
        """The JSON payload of ``frame(seq, text)``, byte for byte as ``encode`` makes it."""
        return f'{self._head}{seq:d},"text":{encode_basestring(text)}}}'.encode()

    def event(self, seq: int, text: str, published_at: float) -> Event:
        """The fan-out event of one delta, its JSON WebSocket frame already built."""
        event = Event.__new__(Event)  # no frame to inspect: every field is known here
        event.conversation_id = self.conversation_id
        event.frame = self.frame(seq, text)
        event.published_at = published_at
        event.offset = 0
        event.seq = seq
        event.generation_id = self.generation_id
        event.exclude_user = None
        event.removed_user = None
        event.ends = None
        event._text = ws_frame(self.json(seq, text), False)
        event._binary = None
        return event


# Between instances only, never sent to a client: a member left the conversation, so each
# instance ends that user's subscriptions to it (they get `left`) and forgets the membership.
MEMBER_REMOVED = "member_removed"


class Event:
    """A frame fanned out to a conversation's members, with what filters need to know."""

    __slots__ = (
        "_binary",
        "_text",
        "conversation_id",
        "ends",
        "exclude_user",
        "frame",
        "generation_id",
        "offset",
        "published_at",
        "removed_user",
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
        self.removed_user: str | None = None
        if kind == MEMBER_REMOVED:
            self.removed_user = str(frame["user_id"])
        # A reply's end may be announced twice (its owner died after announcing it, and the
        # instance that claims it announces it again): the hub passes on the first only.
        self.ends: str | None = str(frame["generation_id"]) if kind == "gen_end" else None
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
