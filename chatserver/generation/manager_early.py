"""The manager's early model calls: begun when a send arrives, adopted by the reply's run
(early.py says why and how)."""

from __future__ import annotations

import asyncio

from protocol import Message, Role
from storage.records import Conversation

from .early import EarlyCall, reply_request
from .manager_state import ManagerState, log

# A user whose send was refused or resent gets no early call for this long: at most one
# model call a minute is thrown away for them, whatever they send.
NO_EARLY_AFTER_WASTE_S = 60.0
_NO_EARLY_USERS_MAX = 10_000  # users remembered for that; past it the memory starts afresh


class _EarlySteps(ManagerState):
    def begin_early(self, conversation: Conversation, text: str, user_id: str) -> EarlyCall | None:
        """The model call of a question about to be appended, begun now where this instance
        holds its context and its append can take the reply's slot (``append_follow``);
        None where it cannot (the reply then calls the model once the append is done)."""
        if not self._early_calls or self._closing or self._early_open >= self._max_held:
            return None
        if self._push is None and not self.provider.closes_between_items:
            return None  # a call not adopted could not be stopped at once
        cid = conversation.id
        agent = self._agents.get(conversation.agent_id)
        window = self._conversations.window
        if agent is None or not window.follows or not self._slot_free_here(cid):
            return None
        loop = asyncio.get_running_loop()
        until = self._no_early.get(user_id)
        if until is not None:
            if loop.time() < until:
                return None
            del self._no_early[user_id]
        kept = window.context_kept(cid)
        if not kept:  # nothing held: a first turn, or a conversation not read here lately
            return None
        # The question as the model sees it: role and text (its id, offset and time come
        # with the append); after what is held, which the append's read must find unchanged.
        last = kept[-1]
        question = Message("", cid, last.offset + 1, Role.USER.value, text, last.created_at)
        model = self._router.route(agent, text, first_turn=False).model
        request = reply_request(agent, model, (*kept, question)[-self._context :])
        try:
            early = EarlyCall(self.provider, self._push, request, self._early_ended)
        except Exception:  # the reply calls the model itself, and meets the error there
            log.exception("an early model call failed to begin")
            return None
        self._early_open += 1
        return early

    def early_wasted(self, early: EarlyCall, user_id: str) -> None:
        """The send behind ``early`` was refused or was a resend: its call is cancelled, and
        the user gets none for a while."""
        early.cancel()
        if len(self._no_early) >= _NO_EARLY_USERS_MAX:
            self._no_early.clear()
        self._no_early[user_id] = asyncio.get_running_loop().time() + NO_EARLY_AFTER_WASTE_S

    def _early_ended(self, early: EarlyCall, adopted: bool) -> None:
        self._early_open -= 1
        self._metrics.child(self._metrics.early_calls, "adopted" if adopted else "cancelled").inc()
