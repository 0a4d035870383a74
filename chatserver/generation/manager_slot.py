"""A reply's slot (one reply per conversation across instances) and its context: taken in
the question's own append where the buffer and window can (its job alone in line: the reply
starts with no round trip), else by the reply itself, beside its context read."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from protocol import ErrorCode, FinishReason, Message, Usage
from storage.jobs.base import ReplyJob
from storage.records import Conversation
from storage.window.base import AppendFollow

from ..errors import ServiceError
from .buffer import ClaimedReply, PreparedReply, ReplyOwner, Slot
from .jobs import generation_id_for
from .manager_state import SLOT_POLL, ManagerState, log, reply_ids
from .provider import Finish
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
        if not self._slot_free_here(conversation.id):
            return None
        first = self._router.route(agent, text, first_turn=True).model
        later = self._router.route(agent, text, first_turn=False).model
        since = self._conversations.window.context_since(conversation.id)

        def follow(question_id: str) -> AppendFollow | None:
            owner = ReplyOwner(
                conversation.id,
                generation_id_for(question_id),
                self._server_id,
                agent.id,
                first,
                question_id,
            )
            return self._buffer.slot_follow(owner, later, self._context, since)

        return follow

    def _slot_free_here(self, conversation_id: str) -> bool:
        """Whether a question's append here may take the reply's slot: no reply streams here
        in the conversation (it holds the slot) and no question waits here for its turn
        (this one's job is not alone in line). Else a follow would be sent to do nothing."""
        live = self._live_in.get(conversation_id)
        # Not once its reply has ended: its release may reach Redis before this append.
        if live is not None and not live.ended:
            return False
        return conversation_id not in self._waiting_turn

    async def _slot_and_context(self, run: ReplyRun) -> tuple[Message, ...]:
        """The slot (waiting while another reply holds it) and the context, read beside it in
        the same round trip (on one instance, after it: there is no round trip to share): the
        turn (or the lane) let this reply go only once every older answer was stored. Taken
        by the question's append already when it could."""
        prepared, run.prepared = run.prepared, None
        cid = run.conversation_id
        if prepared is not None:
            run.watched = prepared.slot.watched
            window = self._conversations.window
            if prepared.context is not None:
                context = window.context_of(cid, prepared.context, self._context)
                if context is not None:
                    return _up_to(context, run)
            return _up_to(await self._conversations.recent(cid, self._context), run)
        if self._buffer.in_process:
            await self._take_slot(run)
            return _up_to(await self._conversations.recent(cid, self._context), run)
        waited, history = await asyncio.gather(
            self._take_slot(run), self._conversations.recent(cid, self._context)
        )
        if waited:  # another reply held the slot (a race): read what it stored too
            history = await self._conversations.recent(cid, self._context)
        return _up_to(history, run)

    async def _job_for(self, run: ReplyRun) -> ReplyJob | None:
        """A reply whose slot stood for its question's job failed before its end: a job
        now, held here, to run again (its slot is kept: the run begins it again)."""
        if self.jobs is None:
            return None
        try:
            job_id = await self._retrying("add a reply job", self.jobs.add, run.reply_to)
        except Exception as exc:  # the slot stays: when this instance stops, a sweep runs it
            log.warning("a failed reply was not made a job: %r", exc, extra=reply_ids(run))
            return None
        log.warning("a reply that failed before its end is a job now", extra=reply_ids(run))
        return ReplyJob(job_id, run.reply_to, claimed=True)

    async def rerun(self, claimed: ClaimedReply) -> None:
        """A reply its question's append started, of which nothing was recorded when its
        owner died: its slot is ours now (``ReplyBuffer.claim``), and it runs here."""
        assert claimed.rerun_offset is not None
        owner = claimed.owner
        cid, offset = owner.conversation_id, claimed.rerun_offset
        try:
            conversation = await self._conversations.get(cid)
            # The window, else the store (a busy conversation may have left it behind).
            page = await self._conversations.history(cid, offset + 1, 1)
        except Exception as exc:
            # The slot is ours now and we live: no other instance would ever take it. It
            # ends here, with why, rather than leave its question unanswered for good.
            log.warning("a reply to run again could not be read: %r", exc, extra=owner.ids())
            why = "a stopped instance's reply could not be run again: its question was unreadable"
            await self.store_and_end(owner, "", Finish(FinishReason.ERROR, Usage(0, 0), why))
            return
        question = next((m for m in page.messages if m.offset == offset), None)
        if question is None or conversation is None or self._agents.get(owner.agent_id) is None:
            why = "the question of a reply cut off by its instance's stop was not found"
            await self.store_and_end(owner, "", Finish(FinishReason.ERROR, Usage(0, 0), why))
            return
        log.warning(
            "running again a reply whose instance died before any of it was recorded",
            extra=owner.ids(),
        )
        prepared = PreparedReply(Slot(watched=True), None, taken_over=True)
        self.start(conversation, question, None, prepared=prepared)

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
