"""The embedded window's idempotency records, kept compact: what a resend's answer needs.

A resend of an accepted message (its ack was lost) is answered with the first message's id,
offset and creation time; nothing else of the message is needed, so nothing else is kept.
Each record is one ``bytes`` of about 40 (expiry, offset, creation in ms, the id's 16 bytes),
under a 128-bit hash of (conversation, user, client_msg_id); the keys, oldest first, in a
deque beside. About 180 bytes a record in all, so the default bound (100,000) holds ~18 MB;
whole ``Message`` objects held ~2.4 KB each (the question and its answer of every reply).

One time to live for every record, so insertion order is expiry order: the oldest are at
the front of the deque, dropped there when they expire or the bound is passed. A key is
added once (a present key answers as a duplicate and is never added again), so a key in
the deque is always the one in the map.
"""

from __future__ import annotations

import hashlib
import struct
import time
import uuid
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from protocol import Message
from protocol.record import record

_HEAD = struct.Struct("<dq")  # expires (clock seconds), offset
_MS = struct.Struct("<q")
_UUID_ID = 1  # the id is a canonical UUID, kept as its 16 bytes
_MS_TIME = 2  # the creation time is whole milliseconds, kept as 8 bytes
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS = timedelta(milliseconds=1)


@record
class Accepted:
    """The first message of a (user, client_msg_id), as its resend is answered."""

    message_id: str
    offset: int
    created_at: str


def record_key(conversation_id: str, user_id: str | None, client_msg_id: str) -> int:
    """128 bits of BLAKE2b: a collision (one new message taken for a resend) is ~1e-29 likely
    per message at the default bound."""
    raw = f"{conversation_id}\x00{user_id or ''}\x00{client_msg_id}".encode()
    return int.from_bytes(hashlib.blake2b(raw, digest_size=16).digest(), "little")


def _ms_text(ms: int) -> str:
    """RFC 3339 UTC with milliseconds, as ``protocol.format_timestamp`` writes it."""
    moment = _EPOCH + ms * _ONE_MS
    return moment.isoformat(timespec="milliseconds")[:-6] + "Z"


def _text_ms(text: str) -> int | None:
    """The milliseconds of a ``format_timestamp`` text, None if it is not exactly one."""
    try:
        ms = (datetime.fromisoformat(text.replace("Z", "+00:00")) - _EPOCH) // _ONE_MS
    except (ValueError, TypeError):
        return None
    return ms if _ms_text(ms) == text else None


def _pack(expires: float, message: Message) -> bytes:
    flags = 0
    try:
        parsed = uuid.UUID(message.id)
        ident = parsed.bytes if str(parsed) == message.id else None
    except ValueError:
        ident = None
    if ident is not None:
        flags |= _UUID_ID
    else:
        ident = message.id.encode()
    ms = _text_ms(message.created_at)
    if ms is not None:
        flags |= _MS_TIME
        created = _MS.pack(ms)
    else:
        created = message.created_at.encode()
        created = bytes([len(created)]) + created
    return bytes([flags]) + _HEAD.pack(expires, message.offset) + created + ident


def _unpack(record: bytes) -> tuple[float, Accepted]:
    flags = record[0]
    expires, offset = _HEAD.unpack_from(record, 1)
    at = 1 + _HEAD.size
    if flags & _MS_TIME:
        created_at = _ms_text(_MS.unpack_from(record, at)[0])
        at += _MS.size
    else:
        size = record[at]
        created_at = record[at + 1 : at + 1 + size].decode()
        at += 1 + size
    rest = record[at:]
    message_id = str(uuid.UUID(bytes=rest)) if flags & _UUID_ID else rest.decode()
    return expires, Accepted(message_id, offset, created_at)


class IdempotencyRecords:
    """(conversation, user, client_msg_id) -> ``Accepted``, for ``ttl_s``, at most
    ``max_keys`` of them (the oldest go first)."""

    def __init__(
        self,
        max_keys: int,
        ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be >= 1")
        self.max_keys = max_keys
        self.ttl_s = ttl_s
        self._clock = clock
        self._records: dict[int, bytes] = {}
        self._order: deque[int] = deque()

    def __len__(self) -> int:
        return len(self._records)

    def clear(self) -> None:
        self._records.clear()
        self._order.clear()

    def get(self, conversation_id: str, user_id: str | None, client_msg_id: str) -> Accepted | None:
        self._prune(self._clock())
        record = self._records.get(record_key(conversation_id, user_id, client_msg_id))
        return None if record is None else _unpack(record)[1]

    def knows(self, conversation_id: str, user_id: str | None, client_msg_id: str) -> bool:
        self._prune(self._clock())
        return record_key(conversation_id, user_id, client_msg_id) in self._records

    def add(self, message: Message) -> None:
        """Remember ``message`` under its (conversation, user, client_msg_id), unless known."""
        if message.client_msg_id is None:
            return
        now = self._clock()
        key = record_key(message.conversation_id, message.user_id, message.client_msg_id)
        if key not in self._records:
            self._records[key] = _pack(now + self.ttl_s, message)
            self._order.append(key)
        self._prune(now)

    def _prune(self, now: float) -> None:
        records, order = self._records, self._order
        while order:
            oldest = order[0]
            expires = _HEAD.unpack_from(records[oldest], 1)[0]
            if expires > now and len(order) <= self.max_keys:
                return
            order.popleft()
            del records[oldest]
