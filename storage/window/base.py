"""The hot window: each conversation's offset counter, epoch and most recent messages."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from protocol import Message

from ..outbox.base import Outbox
from ..records import AppendResult, MessageDraft, WindowView


class WindowMissing(Exception):
    """The conversation's window is not loaded (never was, evicted or flushed): rebuild it."""


class HotWindow(Protocol):
    name: str
    size: int  # messages kept per conversation

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def read(
        self,
        conversation_id: str,
        *,
        after: int = 0,
        before: int | None = None,
        limit: int,
    ) -> WindowView | None:
        """The newest ``limit`` held messages with after < offset < before, oldest first.

        ``None`` when the window is missing (a miss, counted by the implementation).
        """
        ...

    async def rebuild(
        self, conversation_id: str, messages: Sequence[Message], last_offset: int
    ) -> None:
        """Load a missing window from the store under a new epoch.

        If another caller rebuilt it first, keep theirs: offsets must never go backwards.
        """
        ...

    async def append(self, draft: MessageDraft, outbox: Outbox) -> AppendResult:
        """One atomic step: next offset, window entry, outbox entry, idempotency record.

        A repeated (conversation, user, client_msg_id) returns the first message with
        ``duplicate=True`` and appends nothing. Raises ``WindowMissing`` when the
        conversation is not loaded and ``OutboxFull`` when the outbox has no room.
        """
        ...

    async def knows(self, conversation_id: str, user_id: str | None, client_msg_id: str) -> bool:
        """Whether an append of this (user, client_msg_id) would be a duplicate now.

        A look-up for refusals only: a resend of an accepted message is answered as the
        duplicate it is, not refused for a limit it no longer counts against.
        """
        ...

    async def forget(self, conversation_id: str) -> None:
        """Drop the conversation's window (tests and cache flushes)."""
        ...
