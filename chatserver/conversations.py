"""Conversation use-cases: create, membership, append, join views and history pages."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime

from protocol import DEFAULT_LIMITS, ErrorCode, Limits, Message, Role, Since, format_timestamp
from storage.jobs.base import ReplyJobs
from storage.outbox.base import Outbox, OutboxFull
from storage.records import AppendResult, Conversation, MessageDraft, MessagePage, WindowView
from storage.store.base import Store, StoreUnavailable
from storage.window.base import AppendFollow, AppendGate, HotWindow, WindowMissing

from .agents import AgentCatalog
from .auth import Principal
from .conversation_cache import ConversationCache
from .errors import ServiceError

_USER = Role.USER.value  # an enum's .value is a property: not per message

# A message leaves a small window before its batch is stored (writers pace their batches):
# history just beyond the window waits this long at most for the store to catch up.
STORE_CATCH_UP_S = 1.0
STORE_CATCH_UP_POLL_S = 0.02


class JoinView:
    __slots__ = ("messages", "recovered", "view")

    def __init__(self, view: WindowView, recovered: bool, messages: tuple[Message, ...]) -> None:
        self.view = view
        self.recovered = recovered
        self.messages = messages


class ConversationService:
    def __init__(
        self,
        store: Store,
        window: HotWindow,
        outbox: Outbox,
        agents: AgentCatalog,
        *,
        join_messages: int = 50,
        limits: Limits = DEFAULT_LIMITS,
        cache_size: int = 10_000,
        jobs: ReplyJobs | None = None,
    ) -> None:
        self.store = store
        self.jobs = jobs  # a question's reply job is written with its append
        self.window = window
        self.outbox = outbox
        self.agents = agents
        self.join_messages = join_messages
        self.limits = limits  # the same bounds as the WebSocket frames (settings.limits)
        self.cache = ConversationCache(store, cache_size)
        self._rebuilding: dict[str, asyncio.Future[None]] = {}

    async def create(
        self, owner: Principal, agent_id: str, title: str | None, members: list[str]
    ) -> Conversation:
        limits = self.limits
        if self.agents.get(agent_id) is None:
            shown = agent_id[: limits.max_id_chars]
            raise ServiceError(ErrorCode.BAD_REQUEST, f"unknown agent_id {shown!r}")
        title = (title or "").strip()
        if len(title) > limits.max_title_chars:
            raise ServiceError(
                ErrorCode.BAD_REQUEST, f"title longer than {limits.max_title_chars} characters"
            )
        everyone = list(dict.fromkeys([owner.user_id, *members]))
        if len(everyone) > limits.max_members:
            raise ServiceError(ErrorCode.BAD_REQUEST, f"more than {limits.max_members} members")
        for member in everyone:
            if not member or len(member) > limits.max_id_chars:
                raise ServiceError(
                    ErrorCode.BAD_REQUEST, f"member ids must be 1..{limits.max_id_chars} characters"
                )
        await self.store.ensure_user(owner.user_id, owner.tier, owner.role)
        for member in everyone[1:]:
            await self.store.ensure_user(member, "free", "user")
        now = format_timestamp(datetime.now(UTC))
        conversation = Conversation(
            id=str(uuid.uuid4()),
            agent_id=agent_id,
            title=title or "New conversation",
            owner_id=owner.user_id,
            members=tuple(everyone),
            created_at=now,
            updated_at=now,
        )
        await self.store.create_conversation(conversation)
        self.cache.remember(conversation)
        return conversation

    def fill(self) -> Mapping[str, tuple[int, int]]:
        """Entries and bound of the conversation cache, for the gauges."""
        return {"conversation_cache": (len(self.cache), self.cache.size)}

    async def leave(self, conversation_id: str, user_id: str) -> None:
        """Take a member out of a conversation (its own choice). This instance forgets the
        membership at once; another one within ``conversation_cache.CACHE_S``, or at once
        when it has members of the conversation connected (the caller publishes the removal
        to them)."""
        await self.require_member(conversation_id, user_id)
        await self.store.remove_member(conversation_id, user_id)
        self.cache.forget(conversation_id)

    def forget(self, conversation_id: str) -> None:
        """Drop a cached conversation (its members changed elsewhere)."""
        self.cache.forget(conversation_id)

    async def get(self, conversation_id: str) -> Conversation | None:
        """As last read from the store, trusted for ``CACHE_S`` (``conversation_cache``)."""
        return await self.cache.get(conversation_id)

    async def require_member(self, conversation_id: str, user_id: str) -> Conversation:
        conversation = await self.get(conversation_id)
        if conversation is None:
            raise ServiceError(ErrorCode.NOT_FOUND, "no such conversation")
        if user_id not in conversation.members:
            raise ServiceError(ErrorCode.FORBIDDEN, "not a member of this conversation")
        return conversation

    async def append(
        self,
        draft: MessageDraft,
        gate: AppendGate | None = None,
        answers: str | None = None,
        follow: Callable[[str], AppendFollow | None] | None = None,
    ) -> AppendResult:
        """Append to the window (and outbox); ``gate`` is checked in the same step.

        Raises ``AppendRefused`` when the gate refuses. A user's message is a question: its
        reply job is part of the same step (``AppendResult.job_id``). An answer to the reply
        job ``answers`` finishes it in the same step where the window can
        (``AppendResult.job_done``). ``follow``: a step after a question's append, in the
        same step, where the window takes one (``HotWindow.follows``).
        """
        jobs = self.jobs if draft.role == _USER or answers is not None else None
        for _ in range(3):
            try:
                return await self.window.append(draft, self.outbox, gate, jobs, answers, follow)
            except WindowMissing:
                await self._rebuild(draft.conversation_id)
                # Rebuilt (Redis lost its data, or the window expired): the new window
                # knows only its newest messages; an older one resent is in the store.
                if draft.client_msg_id is not None:
                    stored = await self.store.find_by_client_msg_id(
                        draft.conversation_id, draft.user_id, draft.client_msg_id
                    )
                    if stored is not None:
                        return AppendResult(message=stored, duplicate=True)
            except OutboxFull:
                raise ServiceError(
                    ErrorCode.UNAVAILABLE,
                    "persistence is behind, retry shortly",
                    retry_after_ms=1000,
                ) from None
        raise ServiceError(
            ErrorCode.UNAVAILABLE, "conversation window could not be loaded", retry_after_ms=500
        )

    async def was_sent(self, conversation_id: str, user_id: str, client_msg_id: str) -> bool:
        """Whether this user's message with this client_msg_id was accepted (and still known)."""
        return await self.window.knows(conversation_id, user_id, client_msg_id)

    async def was_answered(self, conversation_id: str, generation_id: str) -> bool:
        """Whether the reply ``generation_id`` is stored: in the window's idempotency
        records, else (Redis lost them) in the store."""
        if await self.window.knows(conversation_id, None, generation_id):
            return True
        try:
            found = await self.store.find_by_client_msg_id(conversation_id, None, generation_id)
        except StoreUnavailable:  # the window is the usual witness: do not wait for the store
            return False
        return found is not None

    async def _rebuild(self, conversation_id: str) -> None:
        """Load a missing window from the store; concurrent callers share one load."""
        pending = self._rebuilding.get(conversation_id)
        if pending is not None:
            await asyncio.shield(pending)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._rebuilding[conversation_id] = future
        try:
            page = await self.store.messages_before(conversation_id, None, self.window.size)
            last = await self.store.max_offset(conversation_id)
            await self.window.rebuild(conversation_id, page.messages, last)
            future.set_result(None)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()
            raise
        finally:
            del self._rebuilding[conversation_id]

    async def read_window(
        self, conversation_id: str, *, after: int = 0, before: int | None = None, limit: int
    ) -> WindowView:
        for _ in range(3):
            view = await self.window.read(conversation_id, after=after, before=before, limit=limit)
            if view is not None:
                return view
            await self._rebuild(conversation_id)
        raise ServiceError(
            ErrorCode.UNAVAILABLE, "conversation window could not be loaded", retry_after_ms=500
        )

    async def recent(self, conversation_id: str, limit: int) -> tuple[Message, ...]:
        """The newest messages, for a reply's context: one plain read when the window is
        there, else the full read (which rebuilds a missing window)."""
        messages = await self.window.recent(conversation_id, limit)
        if messages is not None:
            return messages
        return (await self.read_window(conversation_id, limit=limit)).messages

    async def join_view(self, conversation_id: str, since: Since | None) -> JoinView:
        if since is not None:
            view = await self.read_window(
                conversation_id, after=since.offset, limit=self.window.size
            )
            if since.epoch == view.epoch and view.covers_after(since.offset):
                return JoinView(view, True, view.messages)
        view = await self.read_window(conversation_id, limit=self.join_messages)
        return JoinView(view, False, view.messages)

    async def history(self, conversation_id: str, before: int | None, limit: int) -> MessagePage:
        """A page from the hot window, completed from the store beyond it."""
        view = await self.read_window(conversation_id, before=before, limit=limit)
        messages = view.messages
        if len(messages) == limit:
            return MessagePage(messages, messages[0].offset > 1)
        # The window ran out: older messages, if any, are only in the store.
        upper = view.first_offset if before is None else min(before, view.first_offset)
        if upper <= 1:
            return MessagePage(messages, False)
        older = await self._stored_before(conversation_id, upper, limit - len(messages))
        return MessagePage(older.messages + messages, older.has_more)

    async def _stored_before(self, conversation_id: str, upper: int, limit: int) -> MessagePage:
        """The store's page below ``upper``, once it reaches up to it: the messages just
        below the window may still be on their way there. Bounded: past it, what is
        stored (the writer is failing, and history beyond the window is incomplete)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STORE_CATCH_UP_S
        while True:
            older = await self.store.messages_before(conversation_id, upper, limit)
            reached = bool(older.messages) and older.messages[-1].offset == upper - 1
            if reached or loop.time() >= deadline:
                return older
            await asyncio.sleep(STORE_CATCH_UP_POLL_S)
