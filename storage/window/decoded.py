"""Messages the Redis window decoded for a reply's context, kept for the next reply.

Every reply reads its conversation's newest messages (``RedisWindow.recent``). Between two
replies of a conversation only a message or two is new, yet decoding all of them again
(MessagePack, then a ``Message``) was most of the read's cost, and a cost the embedded
window, which holds ``Message`` objects, never pays.

Each kept entry is the payload bytes and time Redis returned with the message decoded from
them. An entry is reused only when Redis returns the same bytes and time at the same offset
(a comparison of bytes): whatever happened to the window meanwhile (a rebuild under a new
epoch, a Redis that lost its data and numbered new messages again), a reused message is
the one Redis holds now.

Bounded in bytes (the payloads plus ``message_bytes`` of what was decoded from them); past
the bound the least recently read conversations are dropped first. A conversation is
kept with exactly its last read's entries, so one is never larger than a context.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping

from protocol import Message

from ..redis_codec import decode_trusted
from .memory import message_bytes

# A kept entry besides its payload and message: its tuple and its slot in the offset map.
ENTRY_BYTES = 160

_Entry = tuple[bytes, int | None, Message]


class DecodedMessages:
    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0 (0: keep nothing)")
        self.max_bytes = max_bytes
        self.reused = 0  # messages served without decoding (for tests and the curious)
        self._conversations: OrderedDict[str, tuple[dict[int, _Entry], int]] = OrderedDict()
        self._bytes = 0

    def fill(self) -> Mapping[str, tuple[int, int]]:
        return {"context_cache_bytes": (self._bytes, self.max_bytes)}

    def decode(
        self, conversation_id: str, entries: Iterable[tuple[int, bytes, int | None]]
    ) -> tuple[Message, ...]:
        """The messages of ``(offset, payload, ms)`` entries, oldest first as given; keeps
        them for the conversation's next read in place of what it kept before."""
        before = self._conversations.pop(conversation_id, None)
        kept: dict[int, _Entry] = {}
        if before is not None:
            kept = before[0]
            self._bytes -= before[1]
        now: dict[int, _Entry] = {}
        size = 0
        messages: list[Message] = []
        for offset, payload, ms in entries:
            entry = kept.get(offset)
            if entry is not None and entry[1] == ms and entry[0] == payload:
                message = entry[2]
                self.reused += 1
            else:
                message = decode_trusted(payload, offset, ms)
                entry = (payload, ms, message)
            now[offset] = entry
            size += ENTRY_BYTES + len(payload) + message_bytes(message)
            messages.append(message)
        if size <= self.max_bytes:
            self._conversations[conversation_id] = (now, size)
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, (_, dropped) = self._conversations.popitem(last=False)
                self._bytes -= dropped
        return tuple(messages)
