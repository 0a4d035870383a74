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

A read may also ask Redis only for what came after the newest offset kept (``since``):
under the same epoch (no rebuild between, which would also follow a Redis that lost its
data) the messages up to it are the ones kept, and ``decode`` puts them in front of the
new ones (``kept_through``). Redis then sends a message or two per reply, not a context.

A message this instance appended itself (a reply's answer) is added to what is kept when it
comes right after it (``add_next``): the next reply's context then needs no read of it, and
it is known before that read (``kept``), so a question's model call can start before its
append returns (chatserver/generation/early.py).

Bounded in bytes (the payloads plus ``message_bytes`` of what was decoded from them); past
the bound the least recently read conversations are dropped first. A conversation is
kept with its last read's entries and what was added after them, so one is never larger
than a context and the few messages appended here since.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from protocol import Message

from ..redis_codec import decode_trusted
from .memory import message_bytes
from .redis_entries import entry_fields

# A kept entry besides its payload and message: its tuple and its slot in the offset map.
ENTRY_BYTES = 160

# (payload, ms, message, bytes kept for it): the size is counted once, when it is decoded.
_Entry = tuple[bytes, int | None, Message, int]


def _entry(payload: bytes, offset: int, ms: int | None) -> _Entry:
    message = decode_trusted(payload, offset, ms)
    return payload, ms, message, ENTRY_BYTES + len(payload) + message_bytes(message)


class DecodedMessages:
    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0 (0: keep nothing)")
        self.max_bytes = max_bytes
        self.reused = 0  # messages served without decoding (for tests and the curious)
        self._conversations: OrderedDict[str, tuple[dict[int, _Entry], int]] = OrderedDict()
        self._epochs: dict[str, bytes] = {}  # the epoch a conversation's kept read was under
        self._bytes = 0

    def fill(self) -> Mapping[str, tuple[int, int]]:
        return {"context_cache_bytes": (self._bytes, self.max_bytes)}

    def since(self, conversation_id: str) -> tuple[int, bytes]:
        """The newest offset kept for the conversation and the epoch it was read under
        ((0, b""): nothing kept, or no epoch known)."""
        found = self._conversations.get(conversation_id)
        epoch = self._epochs.get(conversation_id)
        if found is None or not found[0] or epoch is None:
            return 0, b""
        return max(found[0]), epoch

    def kept(self, conversation_id: str) -> tuple[Message, ...]:
        """The messages kept for the conversation, oldest first (none without an epoch)."""
        found = self._conversations.get(conversation_id)
        if found is None or conversation_id not in self._epochs:
            return ()
        # In offset order: a read keeps them so (``decode``), ``add_next`` adds the next.
        return tuple([entry[2] for entry in found[0].values()])

    def add_next(self, conversation_id: str, offset: int, payload: bytes, ms: int | None) -> bool:
        """Keep the entry appended at ``offset`` when what is kept ends right before it (so
        nothing came between, under the epoch kept); whether it was kept. The payload is
        the bytes the window holds (the append's own), so the message is the one a read
        would decode. Should the window have been rebuilt under another epoch meanwhile,
        what is kept no longer serves a read (its epoch differs: ``since``); an early call
        made from it is compared with the read context and cancelled."""
        found = self._conversations.get(conversation_id)
        if found is None or not found[0] or conversation_id not in self._epochs:
            return False
        entries, size = found
        if next(reversed(entries)) != offset - 1:  # kept in offset order
            return False
        entry = _entry(payload, offset, ms)
        added = entry[3]
        if size + added > self.max_bytes:
            return False
        entries[offset] = entry
        self._conversations[conversation_id] = (entries, size + added)
        self._conversations.move_to_end(conversation_id)
        self._bytes += added
        self._shrink()  # others first: this one is the newest used
        return True

    def followed(
        self, conversation_id: str, read: Sequence[Any], limit: int
    ) -> tuple[Message, ...] | None:
        """What a follow read: the window's entries newest first (as a script returns them),
        the epoch, and the offset they come after (0: all); None when they come after
        messages no longer kept (dropped past the bound, or under another epoch)."""
        entries, epoch, after = read
        after = int(after)
        if after > 0:
            through, kept_epoch = self.since(conversation_id)
            if through < after or kept_epoch != epoch:
                return None
        listed = [entry_fields(entry) for entry in reversed(entries)]
        if after > 0:
            extended = self._extend(conversation_id, listed, epoch, after, limit)
            if extended is not None:
                return extended
        return self.decode(conversation_id, listed, epoch=epoch, kept_through=after, limit=limit)

    def _extend(
        self,
        conversation_id: str,
        entries: list[tuple[int, bytes, int | None]],
        epoch: bytes,
        kept_through: int,
        limit: int,
    ) -> tuple[Message, ...] | None:
        """``decode`` of what a follow read after ``kept_through``, done on the kept entries
        in place: per reply a message or two is new, where rebuilding the entries cost a pass
        over the whole context. None when the read does not come in offset order after them
        (``decode`` then does it)."""
        found = self._conversations.get(conversation_id)
        if found is None:
            return None
        kept, size = found
        last = kept_through
        for offset, _, _ in entries:
            if offset <= last:
                return None
            last = offset
        tail: dict[int, _Entry] = {}  # kept after the read's start (``add_next``): reusable
        while kept and next(reversed(kept)) > kept_through:
            offset, entry = kept.popitem()
            tail[offset] = entry
            size -= entry[3]
        from_kept = len(kept)
        for offset, payload, ms in entries:
            reusable = tail.get(offset)
            if reusable is not None and reusable[1] == ms and reusable[0] == payload:
                self.reused += 1
                entry = reusable
            else:
                entry = _entry(payload, offset, ms)
            kept[offset] = entry
            size += entry[3]
        while len(kept) > limit:
            size -= kept.pop(next(iter(kept)))[3]
            from_kept -= 1
        self.reused += max(0, from_kept)
        self._bytes += size - found[1]
        self._conversations[conversation_id] = (kept, size)
        self._conversations.move_to_end(conversation_id)
        self._epochs[conversation_id] = epoch
        if size > self.max_bytes:  # as decode: a context past the bound is not kept
            self._conversations.pop(conversation_id)
            self._epochs.pop(conversation_id, None)
            self._bytes -= size
        self._shrink()
        return tuple([entry[2] for entry in kept.values()])

    def decode(
        self,
        conversation_id: str,
        entries: Iterable[tuple[int, bytes, int | None]],
        *,
        epoch: bytes | None = None,
        kept_through: int = 0,
        limit: int | None = None,
    ) -> tuple[Message, ...]:
        """The messages of ``(offset, payload, ms)`` entries, oldest first as given; keeps
        them for the conversation's next read in place of what it kept before. With
        ``kept_through`` (the entries are only those after it, read under ``epoch``, which
        ``since`` gave), the kept messages up to it come first; ``limit``: the newest that
        many."""
        before = self._conversations.pop(conversation_id, None)
        kept: dict[int, _Entry] = {}
        if before is not None:
            kept = before[0]
            self._bytes -= before[1]
        self._epochs.pop(conversation_id, None)
        listed: list[tuple[int, _Entry]] = []
        if kept_through > 0:  # kept in offset order (a read's, then what add_next added)
            listed = [item for item in kept.items() if item[0] <= kept_through]
        from_kept = len(listed)
        for offset, payload, ms in entries:
            entry = kept.get(offset)
            if entry is not None and entry[1] == ms and entry[0] == payload:
                self.reused += 1
            else:
                entry = _entry(payload, offset, ms)
            listed.append((offset, entry))
        if limit is not None and len(listed) > limit:
            from_kept = max(0, from_kept - (len(listed) - limit))
            listed = listed[len(listed) - limit :]
        self.reused += from_kept
        now = dict(listed)
        size = sum([entry[3] for entry in now.values()])
        if size <= self.max_bytes:
            self._conversations[conversation_id] = (now, size)
            if epoch is not None:
                self._epochs[conversation_id] = epoch
            self._bytes += size
            self._shrink()
        return tuple(entry[2] for _, entry in listed)

    def _shrink(self) -> None:
        """Back within the bound: the least recently read conversations go first."""
        while self._bytes > self.max_bytes:
            dropped_id, (_, dropped) = self._conversations.popitem(last=False)
            self._epochs.pop(dropped_id, None)
            self._bytes -= dropped
