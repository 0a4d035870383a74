"""The embedded hot window: per-conversation offset counter, epoch and recent messages in memory."""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from protocol import Message, format_timestamp
from protocol.ids import uuid4_str

from ..jobs.base import ReplyJobs
from ..outbox.base import Outbox
from ..records import AppendResult, MessageDraft, WindowView
from .base import AppendGate, WindowMissing

_IdemKey = tuple[str, str, str]  # (conversation_id, user_id or "", client_msg_id)


@dataclass(slots=True)
class _Window:
    epoch: str
    last_offset: int
    messages: deque[Message]  # contiguous offsets ending at last_offset, oldest first


def _new_epoch() -> str:
    return secrets.token_hex(6)


def _idem_key(conversation_id: str, user_id: str | None, client_msg_id: str) -> _IdemKey:
    return (conversation_id, user_id or "", client_msg_id)


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

    def __init__(
        self,
        size: int = 200,
        idempotency_ttl_s: float = 86400,
        max_conversations: int = 100_000,
        *,
        max_idempotency_keys: int = 100_000,
        max_tombstones: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if size < 1 or max_conversations < 1 or max_idempotency_keys < 1:
            raise ValueError("size, max_conversations and max_idempotency_keys must be >= 1")
        self.size = size
        self.idempotency_ttl_s = idempotency_ttl_s
        self.max_conversations = max_conversations
        self.max_idempotency_keys = max_idempotency_keys
        # Tombstones are ints, far cheaper than windows, but still bounded. The oldest one is
        # dropped only after this many other windows were evicted since; by then the batch
        # writer has long persisted its offsets, so the store's max offset is as high.
        self.max_tombstones = (
            max_tombstones if max_tombstones is not None else 10 * max_conversations
        )
        self._clock = clock
        self._windows: OrderedDict[str, _Window] = OrderedDict()  # least recently used first
        self._tombstones: OrderedDict[str, int] = OrderedDict()  # evicted: last offset handed out
        # Kept apart from the windows so idempotency survives eviction. Insertion order is
        # expiry order (one TTL for all), so expired keys are always at the front.
        self._seen: OrderedDict[_IdemKey, tuple[float, Message]] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        self._windows.clear()
        self._tombstones.clear()
        self._seen.clear()

    def __len__(self) -> int:
        """Windows held in full (not counting tombstones)."""
        return len(self._windows)

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
        last = max(last_offset, newest, self._tombstones.pop(conversation_id, 0))
        held = _contiguous_tail(messages, last)[-self.size :]
        self._windows[conversation_id] = _Window(
            epoch=_new_epoch(), last_offset=last, messages=deque(held, maxlen=self.size)
        )
        # The store's copy answers retries that arrive after the window was rebuilt.
        now = self._clock()
        for m in held:
            if m.client_msg_id is not None:
                key = _idem_key(conversation_id, m.user_id, m.client_msg_id)
                if key not in self._seen:
                    self._seen[key] = (now + self.idempotency_ttl_s, m)
        self._prune_seen(now)
        self._evict()

    async def append(
        self,
        draft: MessageDraft,
        outbox: Outbox,
        gate: AppendGate | None = None,
        jobs: ReplyJobs | None = None,
        answers: str | None = None,
    ) -> AppendResult:
        if answers is not None:
            jobs = None  # an answer adds no job; its caller finishes the one it answers
        if gate is not None:
            raise TypeError("the memory window runs no gates (check before appending)")
        cid = draft.conversation_id
        window = self._windows.get(cid)
        if window is None:
            raise WindowMissing(cid)
        self._windows.move_to_end(cid)
        now = self._clock()
        key = None
        if draft.client_msg_id is not None:
            key = _idem_key(cid, draft.user_id, draft.client_msg_id)
            self._prune_seen(now)
            seen = self._seen.get(key)
            if seen is not None:
                return AppendResult(message=seen[1], duplicate=True)
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
        self._commit(window, message)
        if key is not None:
            self._seen[key] = (now + self.idempotency_ttl_s, message)
            self._prune_seen(now)
        # In-process jobs never suspend in add(): the job is part of this same step.
        job_id = await jobs.add(message) if jobs is not None else None
        return AppendResult(message=message, duplicate=False, job_id=job_id)

    async def forget(self, conversation_id: str) -> None:
        window = self._windows.pop(conversation_id, None)
        if window is not None:
            self._bury(conversation_id, window.last_offset)

    def _commit(self, window: _Window, message: Message) -> None:
        held = window.messages
        if not held or held[-1].offset < message.offset:
            held.append(message)
            return
        # Only reachable when outbox.add() suspended and a later append committed first.
        ordered = sorted((*held, message), key=lambda m: m.offset)[-self.size :]
        held.clear()
        held.extend(ordered)

    def _bury(self, conversation_id: str, last_offset: int) -> None:
        prior = self._tombstones.pop(conversation_id, 0)
        self._tombstones[conversation_id] = max(prior, last_offset)
        while len(self._tombstones) > self.max_tombstones:
            self._tombstones.popitem(last=False)

    async def knows(self, conversation_id: str, user_id: str | None, client_msg_id: str) -> bool:
        self._prune_seen(self._clock())
        return _idem_key(conversation_id, user_id, client_msg_id) in self._seen

    def _evict(self) -> None:
        while len(self._windows) > self.max_conversations:
            cid, window = self._windows.popitem(last=False)
            self._bury(cid, window.last_offset)
            self.evictions += 1

    def _prune_seen(self, now: float) -> None:
        seen = self._seen
        while seen:
            key, (expires, _) = next(iter(seen.items()))
            if expires > now and len(seen) <= self.max_idempotency_keys:
                break
            del seen[key]
