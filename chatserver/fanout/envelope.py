"""What travels between instances on Redis pub/sub, typed, with its wire format.

Every payload is one MessagePack array of four items::

    [origin, published_at, conversation_id, body]

- an **event** (on a conversation's channel): ``origin`` the publishing server id,
  ``published_at`` its wall clock (float seconds; receivers time their fan-out delay from
  it), ``conversation_id`` a string, ``body`` the fan-out frame (a map, as sent to clients);
- a **control message** (on an instance's control channel, or a conversation's channel for
  ``watch_ack``): ``published_at`` 0, ``conversation_id`` nil, ``body`` a map with ``type``:

  ========== ====================================== ==========================================
  type       fields                                  meaning
  ========== ====================================== ==========================================
  cancel     generation_id                           stop this reply (sent to its owner)
  watch      conversation_id, generation_id          another instance has a member in now:
                                                     record and publish this reply's deltas
  watch_ack  conversation_id, generation_id, seq     the owner did: Redis holds the text to
                                                     ``seq``, every later delta is published
  presence   conversation_id, origin                 the conversation's online list changed
                                                     (on its channel): members' instances
                                                     read it again (chatserver/presence/)
  ========== ====================================== ==========================================

A control message of an unknown type is ignored (a newer instance may send more kinds).

A user's message is an event like any other, but the Redis window's append script publishes
it, in the step that appends it (so an acknowledged question has always reached the other
instances, whatever instance dies when). Redis gives the message its offset and time after
Python packed the rest, so Python packs the whole envelope but those two fields, last in the
message's map (:func:`appended_head`), and the script adds them. Receivers see an ordinary
``message`` frame.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgpack

from protocol import MessageEvent
from protocol.record import record


@record
class Envelope:
    origin: str
    published_at: float
    conversation_id: str
    frame: dict[str, Any]

    def pack(self) -> bytes:
        body = [self.origin, self.published_at, self.conversation_id, self.frame]
        packed: bytes = msgpack.packb(body, use_bin_type=True)
        return packed


@record
class CancelReply:
    generation_id: str
    TYPE = "cancel"

    def body(self) -> dict[str, Any]:
        return {"type": self.TYPE, "generation_id": self.generation_id}


@record
class WatchReply:
    conversation_id: str
    generation_id: str
    TYPE = "watch"

    def body(self) -> dict[str, Any]:
        return {
            "type": self.TYPE,
            "conversation_id": self.conversation_id,
            "generation_id": self.generation_id,
        }


@record
class WatchAck:
    conversation_id: str
    generation_id: str
    seq: int
    TYPE = "watch_ack"

    def body(self) -> dict[str, Any]:
        return {
            "type": self.TYPE,
            "conversation_id": self.conversation_id,
            "generation_id": self.generation_id,
            "seq": self.seq,
        }


@record
class PresenceChanged:
    conversation_id: str
    origin: str  # the instance whose members changed it (it knows already)
    TYPE = "presence"

    def body(self) -> dict[str, Any]:
        return {"type": self.TYPE, "conversation_id": self.conversation_id, "origin": self.origin}


Control = CancelReply | WatchReply | WatchAck | PresenceChanged


@record
class ControlEnvelope:
    origin: str
    control: Control

    def pack(self) -> bytes:
        packed: bytes = msgpack.packb(
            [self.origin, 0.0, None, self.control.body()], use_bin_type=True
        )
        return packed


def control_from(body: Any) -> Control | None:
    """The typed control message of a decoded body; None if unknown or malformed."""
    if not isinstance(body, dict):
        return None
    kind = body.get("type")
    if kind == PresenceChanged.TYPE:
        conv, origin = body.get("conversation_id"), body.get("origin")
        if isinstance(conv, str) and isinstance(origin, str):
            return PresenceChanged(conv, origin)
        return None
    gen = body.get("generation_id")
    if not isinstance(gen, str):
        return None
    if kind == CancelReply.TYPE:
        return CancelReply(gen)
    conv = body.get("conversation_id")
    if not isinstance(conv, str):
        return None
    if kind == WatchReply.TYPE:
        return WatchReply(conv, gen)
    seq = body.get("seq")
    if kind == WatchAck.TYPE and isinstance(seq, int):
        return WatchAck(conv, gen, seq)
    return None


# Per append: one packer, and the constant parts packed once.
_PACKER = msgpack.Packer(use_bin_type=True)
_ARRAY_OF_4 = _PACKER.pack_array_header(4)
_MESSAGE_FRAME_HEAD = b"".join(
    (
        _PACKER.pack_map_header(2),
        _PACKER.pack("type"),
        _PACKER.pack(MessageEvent.TYPE),
        _PACKER.pack("message"),
    )
)


def appended_head(origin: str, published_at: float, conversation_id: str, payload: bytes) -> bytes:
    """The envelope of the ``message`` frame of a message being appended, packed but for
    its last two fields, ``offset`` and ``created_at``, which the append script adds.

    ``payload``: the message's packed map without those two (storage/redis_codec.py), whose
    entries are copied after a map header that counts two more.
    """
    entries, count = _map_entries(payload)
    pack = _PACKER.pack
    head: bytes = b"".join(
        (
            _ARRAY_OF_4,
            pack(origin),
            pack(published_at),
            pack(conversation_id),
            _MESSAGE_FRAME_HEAD,
            _PACKER.pack_map_header(count + 2),
            entries,
        )
    )
    return head


def _map_entries(packed: bytes) -> tuple[bytes, int]:
    """A packed map's entries (without its header) and their count."""
    first = packed[0]
    if 0x80 <= first <= 0x8F:
        return packed[1:], first & 0x0F
    if first == 0xDE:
        return packed[3:], int.from_bytes(packed[1:3], "big")
    if first == 0xDF:
        return packed[5:], int.from_bytes(packed[1:5], "big")
    raise ValueError("not a packed map")


def own_event_test(origin: str) -> Callable[[bytes], bool]:
    """Whether a payload is an event ``origin`` published, told from its first bytes.

    Every message reaches every instance with a member in its conversation, its publisher's
    included, which has delivered it already: with two instances, half of what each one
    reads. An event starts ``[origin, <float64>, <str>``; a control message of the same
    origin has nil where the conversation is (it is never dropped as an echo). A payload
    this does not recognise is unpacked as usual.
    """
    head = msgpack.packb([origin], use_bin_type=True)[1:]
    head = b"\x94" + head + b"\xcb"  # an array of 4, the origin, a float64 (8 bytes)
    after = len(head) + 8

    def is_own_event(data: bytes) -> bool:
        return data.startswith(head) and len(data) > after and data[after] != 0xC0  # nil

    return is_own_event


def unpack(data: bytes) -> Envelope | ControlEnvelope | None:
    """A payload read from pub/sub; None if it does not decode (logged by the caller)."""
    try:
        origin, published_at, conversation_id, body = msgpack.unpackb(data, raw=False)
    except Exception:
        return None
    if not isinstance(origin, str):
        return None
    if conversation_id is None:
        control = control_from(body)
        return None if control is None else ControlEnvelope(origin, control)
    if not isinstance(conversation_id, str) or not isinstance(body, dict):
        return None
    return Envelope(origin, float(published_at or 0.0), conversation_id, body)
