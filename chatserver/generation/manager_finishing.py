"""The end of a reply: the response cache, the stored answer (retried through store or
Redis outages), the usage, ``gen_end``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from protocol import (
    FinishReason,
    GenEnd,
    Message,
    Role,
)
from storage.records import MessageDraft

from ..errors import DEPENDENCY_ERRORS, ServiceError
from .buffer import ReplyOwner
from .manager_state import (
    OUTAGE_RETRY,
    RETRY_FOR_S,
    ManagerState,
    T,
    log,
)
from .provider import Finish
from .streaming import ReplyRun


class _Finishing(ManagerState):
    async def _cached_answer(self, run: ReplyRun) -> str | None:
        """A cacheable first turn asked before: the stored answer (counted), else None."""
        if run.cache_key is None or self._cache is None:
            return None
        try:
            text = await self._cache.get(run.cache_key)
        except Exception as exc:  # the cache is an optimisation: ask the model
            log.warning("response cache unavailable: %s", exc)
            return None
        if text is None:
            self._metrics.child(self._metrics.model_cache_misses, run.agent.id).inc()
            return None
        run.cache_hit = True
        self._metrics.child(self._metrics.model_cache_hits, run.agent.id).inc()
        return text

    async def _remember(self, run: ReplyRun, finish: Finish) -> None:
        """Keep a whole first-turn answer of a cacheable agent for the next asker."""
        if (
            run.cache_key is None
            or self._cache is None
            or run.cache_hit
            or run.cancel_reason is not None
            or finish.reason != FinishReason.STOP
        ):
            return
        try:
            await self._cache.put(run.cache_key, "".join(run.parts))
        except Exception as exc:
            log.warning("response not cached: %s", exc)

    def _drop_live(self, run: ReplyRun) -> None:
        self._live.pop(run.generation_id, None)
        if self._live_in.get(run.conversation_id) is run:
            del self._live_in[run.conversation_id]

    async def _finalize(self, run: ReplyRun, finish: Finish, duration: float) -> None:
        if run.lost:
            self._drop_live(run)
            return  # the instance that took over stored and ended it
        self._metrics.child(self._metrics.reply_duration, run.agent.id, run.model).observe(duration)
        await self._remember(run, finish)
        # Stored before the buffer goes, in the append's own step where the window takes
        # gates (else just after): an instance dying in between leaves a buffer that another
        # one claims, and its store_and_end finds the message already there (the
        # generation id is the idempotency key): it ends exactly once.
        # The usage charge does not wait for the store: both go to Redis in one round trip.
        store = self._store_and_end(run.owner(self._server_id), "".join(run.parts), finish, run)
        if self._buffer.in_process:
            released = await store
            await self._charge(run, finish)
        else:
            # One task beside this one, not gather's two (~2% of a production instance's
            # py-spy samples): the charge's command is in flight with the store's append.
            charge = asyncio.ensure_future(self._charge(run, finish))
            try:
                released = await store
            except BaseException:
                charge.cancel()  # as gather would on a cancel
                raise
            await charge
        try:
            await self._retrying(
                "release the reply buffer",
                self._buffer.end,
                run.conversation_id,
                run.generation_id,
                released,
            )
        finally:
            self._drop_live(run)

    async def _charge(self, run: ReplyRun, finish: Finish) -> None:
        """The reply's tokens against its asker's daily quota."""
        tokens = finish.usage.input_tokens + finish.usage.output_tokens
        user_id = run.reply_to.user_id
        if self._on_usage is not None and user_id is not None and tokens:
            try:
                await self._on_usage(user_id, tokens)
            except Exception as exc:  # the quota counter lags; the store has the truth
                log.warning("usage not counted: %s", exc)

    async def store_and_end(self, owner: ReplyOwner, text: str, finish: Finish) -> None:
        """Store the reply like any message, then publish ``gen_end`` with it."""
        await self._store_and_end(owner, text, finish)

    async def _store_and_end(
        self, owner: ReplyOwner, text: str, finish: Finish, run: ReplyRun | None = None
    ) -> bool:
        """``store_and_end``; True when the append also released the reply's buffer entry.
        With the ``run`` of a reply job, the append finishes the job where it can
        (``run.job_done``)."""
        conversation_id = owner.conversation_id
        released = False
        message: Message | None = None
        reason = finish.reason
        error = finish.error
        draft = MessageDraft(
            conversation_id=conversation_id,
            role=Role.ASSISTANT.value,
            text=text,
            agent_id=owner.agent_id,
            # The generation id as idempotency key: a retried append, or a second instance
            # ending the same reply, returns the first stored message instead of a copy.
            client_msg_id=owner.generation_id,
            finish_reason=reason,
            usage=finish.usage,
            model=owner.model,
            reply_to=owner.reply_to,
        )
        # Where the window takes gates, the append releases the buffer entry in its own step.
        gate = None
        if self._conversations.window.gates:
            gate = self._buffer.release_gate(conversation_id, owner.generation_id)
        try:
            answers = run.job_id if run is not None else None
            result = await self._retrying(
                "store the reply", self._conversations.append, draft, gate, answers
            )
            if run is not None:
                run.job_done = result.job_done
            message = result.message
            released = gate is not None and not result.duplicate
            if result.duplicate:  # ended before (by the owner, or a claim): say it as it was
                reason = FinishReason(message.finish_reason) if message.finish_reason else reason
                error = None if reason != FinishReason.ERROR else error
            else:
                self._metrics.child(self._metrics.messages_appended, Role.ASSISTANT.value).inc()
        except ServiceError as exc:
            reason, error = FinishReason.ERROR, f"reply not stored: {exc.message}"
        except Exception as exc:  # the clients must still see the reply end
            log.exception(
                "storing a reply failed",
                extra={"conversation": conversation_id, "generation": owner.generation_id},
            )
            reason, error = FinishReason.ERROR, f"reply not stored: {type(exc).__name__}"
        self._metrics.child(self._metrics.replies, reason).inc()
        if reason == FinishReason.ERROR:
            self._metrics.reply_jobs_failed.inc()
        tokens = self._metrics.tokens
        thinking = finish.thinking_tokens
        self._metrics.child(tokens, owner.model, "input").inc(finish.usage.input_tokens)
        # Apart: the answer's tokens and the thinking ones (billed as output, both of them).
        answer = finish.usage.output_tokens - thinking
        self._metrics.child(tokens, owner.model, "output").inc(max(0, answer))
        if thinking:
            self._metrics.child(tokens, owner.model, "thinking").inc(thinking)
        # the code belongs to the model's error, not to a failure to store the reply
        failed = reason == FinishReason.ERROR and error is not None and error == finish.error
        await self._publish(
            conversation_id,
            GenEnd(
                conversation_id,
                owner.generation_id,
                reason,
                finish.usage,
                message,
                error,
                error_code=finish.error_code if failed else None,
                retry_after_ms=finish.retry_after_ms if failed else None,
                thinking_tokens=thinking or None,
            ).to_dict(),
        )
        return released

    async def _retrying(self, what: str, call: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Ride out a dependency outage (Redis or the store restarting) for a while."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RETRY_FOR_S
        delays = OUTAGE_RETRY.delays()
        while True:
            try:
                return await call(*args)
            except DEPENDENCY_ERRORS as exc:
                if loop.time() > deadline:
                    raise
                log.warning("could not %s, retrying: %s", what, exc)
                await asyncio.sleep(next(delays))
