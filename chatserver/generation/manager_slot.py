"""A reply's slot (one reply per conversation across instances) and its context: taken in
the question's own append where the buffer and window can (its job alone in line: the reply
starts with no round trip), else by the reply itself, beside its context read."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from protocol import ErrorCode, Message
from storage.records import Conversation
from storage.window.base import AppendFollow

from ..errors import ServiceError
from .buffer import ReplyOwner
from .jobs import generation_id_for
from .manager_state import SLOT_POLL, ManagerState, log
from .streaming import ReplyRun


def _up_to(history: tuple[Message, ...], run: ReplyRun) -> tuple[Message, ...]:
    """The context of the reply to ``run.reply_to``: what came before it, and it. Questions
    queued behind it (read with it) are theirs to answer, not this reply's."""
    question = run.reply_to
    if history and history[-1].offset > question.offset:
        history = tuple(m for m in history if m.offset <= question.offset)
    if not history or history[-1].offset < question.offset:
        history = (*history, question)
    return history


class _SlotSteps(ManagerState):
    def append_follow(
        self, conversation: Conversation, text: str
    ) -> Callable[[str], AppendFollow | None] | None:
        """For the question's append: the follow that takes its reply's slot and reads its
        context in the same step, from the question's id; None where nothing can."""
        agent = self._agents.get(conversation.agent_id)
        if agent is None or not self._conversations.window.follows:
            return None
        first = self._router.route(agent, text, first_turn=True).model
        later = self._router.route(agent, text, first_turn=False).model

        def follow(question_id: str) -> AppendFollow | None:
            owner = ReplyOwner(
                conversation.id,
                generation_id_for(question_id),
                self._server_id,
                agent.id,
                first,
                question_id,
            )
            return self._buffer.slot_follow(owner, later, self._context)

        return follow

    async def _slot_and_context(self, run: ReplyRun) -> tuple[Message, ...]:
        """The slot (waiting while another reply holds it) and the context, read beside it in
        the same round trip: the turn (or the lane) let this reply go only once every older
        answer was stored. Taken by the question's append already when it could."""
        prepared, run.prepared = run.prepared, None
        cid = run.conversation_id
        if prepared is not None:
            run.watched = prepared.slot.watched
            return _up_to(self._conversations.window.context_of(cid, prepared.context), run)
        waited, history = await asyncio.gather(
            self._take_slot(run), self._conversations.recent(cid, self._context)
        )
        if waited:  # another reply held the slot (a race): read what it stored too
            history = await self._conversations.recent(cid, self._context)
        return _up_to(history, run)

    async def _release_unused_slot(self, run: ReplyRun) -> None:
        """A slot the question's append took for a reply that never streamed (stopping,
        failing before): released, so that a claimer runs the reply, not ends it cut off."""
        if run.prepared is None:
            return
        run.prepared = None
        with contextlib.suppress(Exception):
            await self._buffer.end(run.conversation_id, run.generation_id)
            return
        log.warning("a reply's unused slot was not released: its lease frees it")

    async def _take_slot(self, run: ReplyRun) -> bool:
        """One reply per conversation across instances: wait while another one streams.
        Whether it had to wait."""
        owner = run.owner(self._server_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._slot_wait_s
        delays = SLOT_POLL.delays()
        waited = False
        while (slot := await self._buffer.begin(owner)) is None:
            if loop.time() > deadline:
                raise ServiceError(ErrorCode.UNAVAILABLE, "another reply is still streaming")
            waited = True
            await asyncio.sleep(next(delays))  # rare: replies raced on two instances
        run.watched = slot.watched
        return waited
