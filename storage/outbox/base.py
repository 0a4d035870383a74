"""The outbox: acked messages waiting for the batch writer to persist them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from protocol import Message

from ..records import OutboxEntry


class OutboxFull(Exception):
    """The outbox is at its bound; the message must not be acked."""


class Outbox(Protocol):
    name: str
    # True when other instances drain it too (Redis): a stopping instance only finishes the
    # batch in hand; False (in-process): a stopping instance writes everything first.
    shared: bool

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def add(self, message: Message) -> None:
        """Queue one message; raises ``OutboxFull`` at the bound."""
        ...

    async def read(self, max_count: int, max_wait_s: float) -> list[OutboxEntry]:
        """Up to ``max_count`` entries not yet handed out; waits up to ``max_wait_s`` for one.

        Returns an empty list on timeout, or once ``interrupt`` ended the wait. Entries stay
        pending until acked.
        """
        ...

    def interrupt(self) -> None:
        """End the wait of a read waiting for entries now (it returns what it has: nothing),
        or else the wait of the next one; each call ends one wait (two writers stopping end
        both their reads). A stopping writer does not wait out a long ``max_wait_s``.
        Nothing read is dropped."""
        ...

    async def ack(self, entry_ids: Sequence[str]) -> None:
        """Forget entries the store committed."""
        ...

    async def backlog(self) -> int:
        """Entries queued or handed out but not yet acked."""
        ...
