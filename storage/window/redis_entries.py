"""The Redis window's entries as its scripts return them: decoded, and the tail of a rebuild."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from protocol import Message

from ..redis_codec import TIME_MS, decode_trusted


def contiguous_tail(messages: Sequence[Message], last_offset: int, size: int) -> list[Message]:
    """The newest messages (at most ``size``) that run without a gap up to ``last_offset``."""
    by_offset = {m.offset: m for m in messages}
    tail: list[Message] = []
    offset = last_offset
    while len(tail) < size and offset in by_offset:
        tail.append(by_offset[offset])
        offset -= 1
    tail.reverse()
    return tail


def entry_fields(entry: Any) -> tuple[int, bytes, int | None]:
    """(offset, payload, ms) of a window entry as a script returns it."""
    stream_id, fields = entry[0], entry[1]
    offset = int(stream_id.split(b"-", 1)[0])
    payload: bytes | None = None
    created: int | None = None
    for i in range(0, len(fields) - 1, 2):
        name = fields[i]
        if name == b"m":
            payload = fields[i + 1]
        elif name == TIME_MS:
            created = int(fields[i + 1])
    if payload is None:
        raise ValueError(f"window entry {stream_id!r} has no payload")
    return offset, payload, created


def decode_entry(entry: Any) -> Message:
    offset, payload, created = entry_fields(entry)
    return decode_trusted(payload, offset, created)


def read_entries(entries: Any) -> Iterator[tuple[int, bytes, int | None]]:
    """(offset, payload, ms) of an ``XREVRANGE`` reply as redis-py hands it over (its fields
    a dict; a script's reply stays a list: ``entry_fields``), oldest first."""
    for stream_id, fields in reversed(entries):
        ms = fields.get(TIME_MS)
        yield int(stream_id.split(b"-", 1)[0]), fields[b"m"], int(ms) if ms is not None else None
