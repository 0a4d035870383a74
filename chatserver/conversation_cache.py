"""Conversations as last read from the store, for the membership check of every frame.

A conversation read from the store is trusted for ``CACHE_S``: a member removed on another
instance stops being let in here within that, even with no member of it connected here. Were
an entry read again only once it expired, every busy conversation would make one send in
``CACHE_S`` wait for the store, on the way to its ack and its reply's first token (under load
a round trip of tens of milliseconds; on the embedded store, a read queued behind a batch
write). So an entry used past ``REFRESH_S`` is read again in the background while it still
serves: a conversation in use never waits for the store. The bound stays: a refreshed entry
counts its age from when its read began, and one that expires waits for the store as before.
The entries that come due within ``REFRESH_GATHER_S`` of each other are read again together,
in one query: with thousands of conversations in use, a few reads a second, not one per
conversation every ``REFRESH_S``.

In a store outage an expired entry still serves (the members as last read hold, or every send
to a busy conversation would be refused after ``CACHE_S`` of an outage the outbox is there to
ride out); what was never read needs the store.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict

from storage.records import Conversation
from storage.store.base import Store, StoreUnavailable

log = logging.getLogger(__name__)

CACHE_S = 10.0
REFRESH_S = CACHE_S / 2
# Well within CACHE_S - REFRESH_S: a gathered entry is read again long before it expires.
REFRESH_GATHER_S = 0.5
# Entries due or being read again at once, at most: past this a due entry waits for the next
# use (and, should none come before it expires, that use reads the store as before).
MAX_REFRESHING = 1024


class ConversationCache:
    """At most ``size`` conversations, least recently used dropped first (module docstring)."""

    def __init__(self, store: Store, size: int) -> None:
        self.store = store
        self.size = size
        # id -> (conversation, monotonic time its read began)
        self._entries: OrderedDict[str, tuple[Conversation, float]] = OrderedDict()
        # Due to be read again, and being read: id -> the entry's read time when it came due
        self._due: dict[str, float] = {}
        self._reading: dict[str, float] = {}
        self._reader: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def refreshing(self) -> int:
        """Entries due to be read again in the background, or being read."""
        return len(self._due) + len(self._reading)

    def remember(self, conversation: Conversation, read_at: float | None = None) -> None:
        entries = self._entries
        entries[conversation.id] = (
            conversation,
            time.monotonic() if read_at is None else read_at,
        )
        entries.move_to_end(conversation.id)
        while len(entries) > self.size:
            entries.popitem(last=False)

    def forget(self, conversation_id: str) -> None:
        """Drop an entry (its members changed): a read in flight does not bring it back."""
        self._entries.pop(conversation_id, None)

    async def get(self, conversation_id: str) -> Conversation | None:
        cached = self._entries.get(conversation_id)
        now = time.monotonic()
        if cached is not None:
            conversation, read_at = cached
            age = now - read_at
            if age < CACHE_S:
                self._entries.move_to_end(conversation_id)
                if age >= REFRESH_S:
                    self._refresh_soon(conversation_id, read_at)
                return conversation
        try:
            conversation_or_none = await self.store.get_conversation(conversation_id)
        except StoreUnavailable:
            if cached is None:
                raise
            return cached[0]  # the outage rule (module docstring); forget still drops it
        if conversation_or_none is None:
            self._entries.pop(conversation_id, None)  # deleted: no outage brings it back
        else:
            self.remember(conversation_or_none, now)
        return conversation_or_none

    def _refresh_soon(self, conversation_id: str, read_at: float) -> None:
        if conversation_id in self._due or conversation_id in self._reading:
            return
        if self.refreshing >= MAX_REFRESHING:
            return
        self._due[conversation_id] = read_at
        if self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(
                self._read_due(), name="conversation-refresh"
            )

    async def _read_due(self) -> None:
        """Read the due entries again, together, until none is due."""
        try:
            while self._due:
                await asyncio.sleep(REFRESH_GATHER_S)  # let the others due about now join
                self._reading, self._due = self._due, {}
                try:
                    await self._refresh(self._reading)
                finally:
                    self._reading = {}
        finally:
            self._reader = None

    async def _refresh(self, due: dict[str, float]) -> None:
        began = time.monotonic()
        try:
            found = await self.store.get_conversations(list(due))
        except StoreUnavailable as exc:
            log.debug("conversations not refreshed, the store is down: %s", exc)
            return
        except Exception:  # the entries serve until they expire; their next read reports anew
            log.exception("conversation refresh failed")
            return
        entries = self._entries
        for conversation_id, read_at in due.items():
            current = entries.get(conversation_id)
            if current is None or current[1] != read_at:
                continue  # forgotten or read again meanwhile: this read may be the older one
            conversation = found.get(conversation_id)
            if conversation is None:
                del entries[conversation_id]  # deleted: the next use asks the store
            else:
                entries[conversation_id] = (conversation, began)

    async def settled(self) -> None:
        """Every entry due has been read again (or its read failed)."""
        while self._reader is not None:
            await asyncio.wait({self._reader})

    async def close(self) -> None:
        reader = self._reader
        if reader is not None:
            reader.cancel()
            await asyncio.wait({reader})
        self._due.clear()
