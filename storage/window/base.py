"""The hot window: each conversation's offset counter, epoch and most recent messages."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from protocol import Message
from protocol.record import record

from ..jobs.base import ReplyJobs
from ..outbox.base import Outbox
from ..records import AppendResult, MessageDraft, WindowView


class WindowMissing(Exception):
    """The conversation's window is not loaded (never was, evicted or flushed): rebuild it."""


class AppendRefused(Exception):
    """The append's gate refused it; nothing was appended. ``code`` and ``value`` are the gate's."""

    def __init__(self, code: int, value: int) -> None:
        super().__init__(f"append refused by its gate: {code} ({value})")
        self.code = code
        self.value = value


@record
class AppendGate:
    """A check that the append runs in its own atomic step (the same round trip).

    ``lua``: the body of a Lua function of ``K`` (the gate's ``keys``), ``A`` (its
    ``args``) and ``V`` (the values of its keys, read by the append's own MGET: false where a
    key is missing or holds no string; nil when the gate runs on its own, reading them
    itself) that returns ``{code, value}``, code 0 to let the append go, any other code to
    refuse it (``AppendRefused``). It runs after the idempotency check (a resend of an
    accepted message is never refused) and the window's own checks (an append that will be
    retried has not passed it yet), right before anything is written. Only windows whose
    ``gates`` is true take one (a single Redis: on a cluster the gate's keys live elsewhere).
    The body may call the shared prelude's helpers (``now_ms()``: ``storage/lua/prelude.lua``).
    """

    lua: str
    keys: tuple[str, ...]
    args: tuple[str | int, ...]


@record
class AppendFollow:
    """A step the append runs after a question's, in its own atomic step, when the
    question's reply job is alone in line (no older job of the conversation is unfinished).

    ``lua``: the body of a Lua function of ``K`` (the follow's ``keys``, in the
    conversation's slot), ``A`` (its ``args``), ``V`` (the values of its keys, read by the
    append's own MGET: false where a key is missing or holds no string) and the question's
    offset. What it returns is the result's ``followed`` (None when it did not run). A table
    (a Lua array) it returns stands for the question's reply job: the append adds none
    (``job_id`` None), and whoever wrote the follow answers for the question being answered
    (the reply slot's own sweep does, chatserver/generation/leases.py). Only windows whose
    ``follows`` is true take one.
    """

    lua: str
    keys: tuple[str, ...]
    args: tuple[str | int | bytes, ...]


class HotWindow(Protocol):
    name: str
    size: int  # messages kept per conversation
    gates: bool  # whether append() takes an AppendGate
    follows: bool  # whether append() takes an AppendFollow
    hits: int  # reads that found the window (since start), for the metrics
    misses: int  # reads that found it missing

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

    async def recent(self, conversation_id: str, limit: int) -> tuple[Message, ...] | None:
        """The newest ``limit`` messages, oldest first, as cheaply as the window can (a
        reply's context); None when they cannot be read this way (``read`` then says why)."""
        ...

    async def rebuild(
        self, conversation_id: str, messages: Sequence[Message], last_offset: int
    ) -> None:
        """Load a missing window from the store under a new epoch.

        If another caller rebuilt it first, keep theirs: offsets must never go backwards.
        """
        ...

    async def append(
        self,
        draft: MessageDraft,
        outbox: Outbox,
        gate: AppendGate | None = None,
        jobs: ReplyJobs | None = None,
        answers: str | None = None,
        follow: Callable[[str], AppendFollow | None] | None = None,
    ) -> AppendResult:
        """One atomic step: next offset, window entry, outbox entry, idempotency record,
        and with ``jobs`` the question's reply job (its id in the result); ``follow`` makes
        the step to run after it, from the new message's id (``AppendFollow``; None: none).
        With ``jobs`` and ``answers`` (a job id) the message is that job's answer instead:
        windows that can finish the job in the same step do (``job_done`` in the result);
        else the caller finishes it.

        A repeated (conversation, user, client_msg_id) returns the first message with
        ``duplicate=True`` and appends nothing. Raises ``WindowMissing`` when the
        conversation is not loaded, ``OutboxFull`` when the outbox has no room and
        ``AppendRefused`` when ``gate`` refuses.
        """
        ...

    def context_since(self, conversation_id: str) -> tuple[int, bytes]:
        """The offset through which this window holds the conversation's context decoded, and
        the epoch it read it under, for a follow to read only what came after ((0, b""):
        all)."""
        ...

    def context_kept(self, conversation_id: str) -> tuple[Message, ...]:
        """The conversation's newest messages as this window holds them decoded, oldest
        first, with no read: what ``context_since`` covers (windows that take follows;
        empty: none held). They may be behind the window: a follow's read says."""
        ...

    def context_of(
        self, conversation_id: str, read: Sequence[Any], limit: int
    ) -> tuple[Message, ...] | None:
        """The newest ``limit`` messages, oldest first, from what a follow read: the window
        entries newest first, the epoch, and the offset they come after (0: all of them)
        (windows that take follows); None when what came before that offset is no longer
        at hand (the caller reads the context itself)."""
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
