"""The embedded hot window: per-conversation offset counter, epoch and recent messages in memory.

Bounded in bytes: each window's messages are counted at ``MESSAGE_BYTES`` plus their text's
own size (``sys.getsizeof``), each window at ``WINDOW_BYTES``; past ``max_bytes`` (or
``max_conversations``) the least recently used windows go. An evicted window whose offsets
the store may not have yet leaves a tombstone (its last offset; at most ``max_tombstones``),
so a rebuild never hands an offset out twice. Idempotency records are kept apart, compact
(``idempotency.py``), so they survive eviction.
"""

from __future__ import annotations

import builtins
import secrets
import sys
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from protocol import Message, format_timestamp
from protocol.ids import uuid4_str

from ..jobs.base import ReplyJobs
from ..outbox.base import Outbox
from ..records import AppendResult, MessageDraft, WindowView
from .base import AppendFollow, AppendGate, WindowMissing
from .idempotency import Accepted, IdempotencyRecords

# What a held message costs besides its text, measured (tests/storage/test_memory_bounds.py):
# the Message, its id, conversation id, time, user or agent fields, usage, the deque slot.
MESSAGE_BYTES = 768
WINDOW_BYTES = 2048  # a window itself: the deque, its epoch, its entry in the LRU map


def message_bytes(message: Message) -> int:
    return MESSAGE_BYTES + sys.getsizeof(message.text)


@dataclass(slots=True)
class _Window:
    epoch: str
    last_offset: int
    messages: deque[Message]  # contiguous offsets ending at last_offset, oldest first
    stored: int  # the store's newest offset when the window was built: it has these
    bytes: int = WINDOW_BYTES


def _new_epoch() -> str:
    return secrets.token_hex(6)


def _contiguous_tail(messages: Sequence[Message], last_offset: int) -> list[Message]:
    """The newest messages that run without a gap up to ``last_offset``.

    A window may only claim what it really holds: if the store lags behind the counter (the
    outbox still holds the newest messages), an older run would make ``covers_after`` lie.
    """
    ordered = sorted(messages, key=lambda m: m.offset)
    tail: list[Message] = []
    expected = last_offset
    for m in reversed(ordered):
        if m.offset != expected:
            break
        tail.append(m)
        expected -= 1
    tail.reverse()
    return tail


class MemoryWindow:
    name = "memory"
    gates = False  # in-process: the caller's own check is as atomic (no await between)
    follows = False

    def __init__(
        self,
        size: int = 200,
        idempotency_ttl_s: float = 86400,
        max_conversations: int = 100_000,
        *,
        max_bytes: int = 64 * 1024 * 1024,
        max_idempotency_keys: int = 100_000,
        max_tombstones: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if min(size, max_conversations, max_idempotency_keys, max_tombstones, max_bytes) < 1:
            raise ValueError("the window's size and bounds must be >= 1")
        self.size = size
        self.idempotency_ttl_s = idempotency_ttl_s
        self.max_conversations = max_conversations
        self.max_bytes = max_bytes
        self.max_idempotency_keys = max_idempotency_keys
        # A tombstone is kept only for a window whose newest offsets the store may lack
        # (appended since it was built): one per conversation with messages in the outbox,
        # so the outbox's bound is the natural one. The oldest goes first, by then long stored.
        self.max_tombstones = max_tombstones
        self._windows: OrderedDict[str, _Window] = OrderedDict()  # least recently used first
        self._tombstones: OrderedDict[str, int] = OrderedDict()  # evicted: last offset handed out
        self._bytes = 0  # the windows' estimated size (``message_bytes``, ``WINDOW_BYTES``)
        self._seen = IdempotencyRecords(max_idempotency_keys, idempotency_ttl_s, clock)
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        self._windows.clear()
        self._tombstones.clear()
        self._seen.clear()
        self._bytes = 0

    def __len__(self) -> int:
        """Windows held in full (not counting tombstones)."""
        return len(self._windows)

    @property
    def bytes(self) -> int:
        """The windows' estimated size, what ``max_bytes`` bounds."""
        return self._bytes

    def fill(self) -> Mapping[str, tuple[int, int]]:
        """Entries and bound of each structure, for the gauges (``chatserver.ops.memory``)."""
        return {
            "window_conversations": (len(self._windows), self.max_conversations),
            "window_bytes": (self._bytes, self.max_bytes),
            "window_tombstones": (len(self._tombstones), self.max_tombstones),
            "idempotency_keys": (len(self._seen), self.max_idempotency_keys),
        }

    async def recent(self, conversation_id: str, limit: int) -> tuple[Message, ...] | None:
        view = await self.read(conversation_id, limit=limit)
        return None if view is None else view.messages

    async def read(
        self,
        conversation_id: str,
        *,
        after: int = 0,
        before: int | None = None,
        limit: int,
    ) -> WindowView | None:
        window = self._windows.get(conversation_id)
        if window is None:
            self.misses += 1
            return None
        self.hits += 1
        self._windows.move_to_end(conversation_id)
        picked: list[Message] = []
        if limit > 0:
            # Newest first so the walk stops after ``limit`` instead of scanning the window.
            for m in reversed(window.messages):
                if m.offset <= after:
                    break
                if before is not None and m.offset >= before:
                    continue
                picked.append(m)
                if len(picked) >= limit:
                    break
            picked.reverse()
        held = window.messages
        first = held[0].offset if held else window.last_offset + 1
        return WindowView(
            epoch=window.epoch,
            last_offset=window.last_offset,
            first_offset=first,
            messages=tuple(picked),
        )

    async def rebuild(
        self, conversation_id: str, messages: Sequence[Message], last_offset: int
    ) -> None:
        if conversation_id in self._windows:
            self._windows.move_to_end(conversation_id)
            return
        newest = max((m.offset for m in messages), default=0)
        stored = max(last_offset, newest)
        last = max(stored, self._tombstones.pop(conversation_id, 0))
        held = _contiguous_tail(messages, last)[-self.size :]
        window = _Window(
            epoch=_new_epoch(),
            last_offset=last,
            messages=deque(held, maxlen=self.size),
            stored=stored,
        )
        window.bytes += sum(message_bytes(m) for m in held)
        self._windows[conversation_id] = window
        self._bytes += window.bytes
        # The store's copy answers retries that arrive after the window was rebuilt.
        for m in held:
            self._seen.add(m)
        self._evict()

    async def append(
        self,
        draft: MessageDraft,
        outbox: Outbox,
        gate: AppendGate | None = None,
        jobs: ReplyJobs | None = None,
        answers: str | None = None,
        follow: Callable[[str], AppendFollow | None] | None = None,
    ) -> AppendResult:
        if answers is not None:
            jobs = None  # an answer adds no job; its caller finishes the one it answers
        if gate is not None:
            raise TypeError("the memory window runs no gates (check before appending)")
        if follow is not None:
            raise TypeError("the memory window runs no follows (its caller is as quick)")
        cid = draft.conversation_id
        window = self._windows.get(cid)
        if window is None:
            raise WindowMissing(cid)
        self._windows.move_to_end(cid)
        if draft.client_msg_id is not None:
            seen = self._seen.get(cid, draft.user_id, draft.client_msg_id)
            if seen is not None:
                return AppendResult(message=_first(window, draft, seen), duplicate=True)
        offset = window.last_offset + 1
        message = draft.complete(uuid4_str(), offset, format_timestamp(datetime.now(UTC)))
        # Reserve the offset before the only await: should an outbox ever suspend in add(),
        # a concurrent append or an eviction still cannot hand the same offset out again.
        window.last_offset = offset
        try:
            await outbox.add(message)
        except BaseException:
            if window.last_offset == offset:
                window.last_offset = offset - 1  # nothing else moved: leave no trace
            elif (tomb := self._tombstones.get(cid)) is not None and tomb == offset:
                self._tombstones[cid] = offset - 1
            raise
        if self._windows.get(cid) is window:  # not evicted while the outbox took it
            self._commit(window, message)
        self._seen.add(message)
        self._evict()
        # In-process jobs never suspend in add(): the job is part of this same step.
        job_id = await jobs.add(message) if jobs is not None else None
        return AppendResult(message=message, duplicate=False, job_id=job_id)

    async def forget(self, conversation_id: str) -> None:
        window = self._windows.pop(conversation_id, None)
        if window is not None:
            self._drop(conversation_id, window)

    def _commit(self, window: _Window, message: Message) -> None:
        held = window.messages
        before = window.bytes
        if not held or held[-1].offset < message.offset:
            if len(held) == self.size:
                window.bytes -= message_bytes(held[0])  # the deque drops it
            held.append(message)
            window.bytes += message_bytes(message)
        else:
            # Only reachable when outbox.add() suspended and a later append committed first.
            ordered = sorted((*held, message), key=lambda m: m.offset)[-self.size :]
            held.clear()
            held.extend(ordered)
            window.bytes = WINDOW_BYTES + sum(message_bytes(m) for m in held)
        self._bytes += window.bytes - before

    def _drop(self, conversation_id: str, window: _Window) -> None:
        """Account for a window taken out; a tombstone if the store may lack its offsets."""
        self._bytes -= window.bytes
        if window.last_offset <= window.stored:
            return  # every offset it gave out is in the store: a rebuild finds them there
        prior = self._tombstones.pop(conversation_id, 0)
        self._tombstones[conversation_id] = max(prior, window.last_offset)
        while len(self._tombstones) > self.max_tombstones:
            self._tombstones.popitem(last=False)

    def context_since(self, conversation_id: str) -> tuple[int, builtins.bytes]:
        return 0, b""

    def context_kept(self, conversation_id: str) -> tuple[Message, ...]:
        return ()

    def context_of(
        self, conversation_id: str, read: Sequence[Any], limit: int
    ) -> tuple[Message, ...] | None:
        raise TypeError("the memory window runs no follows")

    async def knows(self, conversation_id: str, user_id: str | None, client_msg_id: str) -> bool:
        return self._seen.knows(conversation_id, user_id, client_msg_id)

    def _evict(self) -> None:
        windows = self._windows
        # The most recently used window stays, even alone over the bound: it is in use.
        while len(windows) > 1 and (
            len(windows) > self.max_conversations or self._bytes > self.max_bytes
        ):
            cid, window = windows.popitem(last=False)
            self._drop(cid, window)
            self.evictions += 1


def _first(window: _Window, draft: MessageDraft, seen: Accepted) -> Message:
    """The first message of a resend: the window's own while it holds it, else the resend's
    draft in the first one's place (same id, offset and time; a resend carries its text)."""
    held = window.messages
    if held:
        index = seen.offset - held[0].offset
        if 0 <= index < len(held) and held[index].id == seen.message_id:
            return held[index]
    return draft.complete(seen.message_id, seen.offset, seen.created_at)
