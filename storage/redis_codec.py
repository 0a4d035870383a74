"""How messages sit in Redis: one msgpack payload per message, encoded once.

A message appended through the Lua script gets its offset and creation time inside Redis, after
Python encoded the payload; so the payload of a fresh message lacks ``offset`` and
``created_at``, and those travel beside it (the window entry's id is the offset, its field ``t``
the creation time in ms; an outbox entry has fields ``o`` and ``t``). A message that already
had them (one loaded from the store, or handed to ``Outbox.add``) carries them in its payload.
Decoding merges the two.
"""

from __future__ import annotations

import functools
from datetime import UTC, datetime, timedelta
from typing import Any

import msgpack

from protocol import Message, Usage
from protocol.message import optional_message_fields

from .records import MessageDraft

# Field names of stream entries (short: they are repeated in every entry).
PAYLOAD = b"m"
OFFSET = b"o"
TIME_MS = b"t"

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@functools.lru_cache(maxsize=4096)
def _second_prefix(seconds: int) -> str:
    return (_EPOCH + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%S.")


def fast_timestamp(created_ms: int) -> str:
    """``protocol.timestamp_from_ms``, exact, with the date part cached per second."""
    seconds, ms = divmod(created_ms, 1000)
    return f"{_second_prefix(seconds)}{ms:03d}Z"


def draft_payload(message_id: str, draft: MessageDraft) -> bytes:
    """The payload of a message still without offset and created_at."""
    obj: dict[str, Any] = {
        "id": message_id,
        "conversation_id": draft.conversation_id,
        "role": draft.role,
        "text": draft.text,
    }
    obj.update(optional_message_fields(draft))
    if draft.usage is not None:
        obj["usage"] = draft.usage.to_dict()
    packed: bytes = msgpack.packb(obj)
    return packed


def message_payload(message: Message) -> bytes:
    """The payload of a complete message."""
    packed: bytes = msgpack.packb(message.to_dict())
    return packed


def message_from_draft(
    message_id: str, draft: MessageDraft, offset: int, created_ms: int
) -> Message:
    return draft.complete(message_id, offset, fast_timestamp(created_ms))


def decode_message(payload: bytes, offset: int | None, created_ms: int | None) -> Message:
    """The message of a payload, with the offset and time kept beside it (when given).

    Raises ``ValueError`` (or the protocol's validation error) for anything malformed.
    """
    obj = msgpack.unpackb(payload)
    if not isinstance(obj, dict):
        raise ValueError(f"message payload is a {type(obj).__name__}, not a map")
    if offset is not None:
        obj["offset"] = offset
    if created_ms is not None:
        obj["created_at"] = fast_timestamp(created_ms)
    return Message.from_dict(obj)


def decode_trusted(payload: bytes, offset: int, created_ms: int | None) -> Message:
    """Like :func:`decode_message` for payloads this package wrote itself (the window).

    Skips the field-by-field validation (the text was checked on input), which is most of
    the cost of a window read; anything unexpected takes the validating path.
    """
    return _built(payload, offset, created_ms) or decode_message(payload, offset, created_ms)


def decode_stored(payload: bytes, offset: int | None, created_ms: int | None) -> Message:
    """Like :func:`decode_message` for a message on its way to the store (an outbox entry):
    built as :func:`decode_trusted` builds it, then its types checked (``well_typed``), as
    a row must have them; anything else takes the validating path, and raises there."""
    message = _built(payload, offset, created_ms)
    if message is not None and message.well_typed():
        return message
    return decode_message(payload, offset, created_ms)


def _built(payload: bytes, offset: int | None, created_ms: int | None) -> Message | None:
    try:
        fields = msgpack.unpackb(payload)
        if type(fields) is not dict:
            return None
        if offset is not None:
            fields["offset"] = offset
        if created_ms is not None:
            fields["created_at"] = fast_timestamp(created_ms)
        usage = fields.get("usage")
        if usage is not None:
            fields["usage"] = Usage(usage["input_tokens"], usage["output_tokens"])
        return Message(**fields)
    except (TypeError, ValueError, KeyError, msgpack.UnpackException):
        return None


def decode_record(record: bytes) -> tuple[int, int | None, bytes]:
    """An idempotency record ``<offset>:<ms or empty>:<payload>`` (written by the Lua scripts)."""
    offset, ms, payload = record.split(b":", 2)
    return int(offset), (int(ms) if ms else None), payload


def as_str(value: Any) -> str:
    """A Redis reply's value as text: bytes decoded (a client without ``decode_responses``)."""
    return value.decode() if isinstance(value, bytes) else str(value)
