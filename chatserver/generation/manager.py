"""Runs agents' replies: one task per reply, streamed as deltas, stored when done.

The reply task takes the conversation's slot, announces ``gen_start``, starts the provider
stream and waits for it to end; the chunks themselves never pass through the task. A
provider that can push (the local one) calls the run from its own timer; any other is
iterated by a producer task, and cancelling that task is what closes an upstream HTTP
stream at once. Either way the ``DeltaPump`` records the chunks in the resume buffer and
publishes them, a batch per loop tick (see streaming.py), and the reply task stores the
final message like any other. Replies of one conversation run one after another.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from protocol import (
    ErrorCode,
    FinishReason,
    GenEnd,
    GenerationSnapshot,
    GenStart,
    Message,
    MessageEvent,
    Role,
    Usage,
)
from protocol.backoff import Backoff
from storage.jobs.base import ReplyJob, ReplyJobs, Turn
from storage.records import Conversation, MessageDraft

from ..agents import AgentCatalog
from ..conversations import ConversationService
from ..errors import DEPENDENCY_ERRORS, ServiceError
from ..fanout.envelope import CancelReply, Control, WatchAck, WatchReply
from ..fanout.events import Event
from ..ops.metrics import Metrics
from .buffer import ReplyBuffer, ReplyOwner
from .cache import ResponseCache, cache_key
from .jobs import generation_id_for
from .leases import end_orphan, keep_leases
from .local import count_tokens
from .provider import Finish, Provider, PushProvider, ReplyRequest
from .routing import Router, is_first_turn
from .sources import replay, start_stream
from .streaming import DeliverEvents, DeltaPump, Publish, PublishEvents, ReplyRun

log = logging.getLogger("chatserver.generation")

SendControl = Callable[[str, Control], Awaitable[None]]
Announce = Callable[[str, Control], Awaitable[None]]
OnUsage = Callable[[str, int], Awaitable[None]]  # (user billed, tokens)
_RETRY_FOR_S = 30.0  # how long a finishing reply waits out a Redis or store outage
# How long a join waits for the owner of an unwatched reply to record its text; past it
# (the owner died) the join takes what Redis holds, the last checkpoint.
WATCH_ACK_TIMEOUT_S = 2.0
T = TypeVar("T")

__all__ = ["GenerationManager", "ReplyRun"]


class _Lane:
    __slots__ = ("lock", "waiting")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.waiting = 0


class GenerationManager:
    def __init__(
        self,
        conversations: ConversationService,
        publish: Publish,
        buffer: ReplyBuffer,
        provider: Provider,
        agents: AgentCatalog,
        metrics: Metrics,
        *,
        server_id: str,
        send_control: SendControl | None = None,
        publish_events: PublishEvents | None = None,
        deliver_events: DeliverEvents | None = None,
        announce: Announce | None = None,
        router: Router | None = None,
        cache: ResponseCache | None = None,
        on_usage: OnUsage | None = None,
        max_queued: int = 4,
        context_messages: int = 50,
        slot_wait_s: float = 60.0,
        jobs: ReplyJobs | None = None,
        max_held: int = 256,
        attempts: int = 3,
    ) -> None:
        self._conversations = self.conversations = conversations
        self._publish = publish
        self._buffer = buffer
        self.provider = provider
        self._agents = self.agents = agents
        self._metrics = self.metrics = metrics
        self._server_id = self.server_id = server_id
        self._send_control = send_control
        self._router = router if router is not None else Router()
        self._cache = cache
        self._on_usage = on_usage
        self._max_queued = max_queued
        self._context = context_messages
        self._slot_wait_s = slot_wait_s
        self.jobs = jobs
        self._max_held = max_held
        self._attempts = attempts
        self._backoff = Backoff(0.5, 8.0)  # between attempts of a reply (model errors)
        self.held: dict[str, ReplyJob] = {}  # the jobs this instance runs or queues, by id
        self.retry_jobs: list[ReplyJob] = []  # failed before an end: run again (claims.py)
        self._runs: dict[str, ReplyRun] = {}
        # Runs holding their conversation's slot, until the buffer is released: a join
        # here reads their text, a watcher elsewhere asks them for it.
        self._live: dict[str, ReplyRun] = {}
        self._live_in: dict[str, ReplyRun] = {}  # the same, by conversation
        self._acks: dict[str, list[asyncio.Future[None]]] = {}  # joins awaiting watch_ack
        self._deliver_events = deliver_events
        self._announce = announce
        self._lanes: dict[str, _Lane] = {}
        self._pending = 0
        self._turns: dict[str, asyncio.Event] = {}  # set when a job of the conversation ends
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False
        # Checked once: the provider is fixed for the life of the manager.
        self._push: PushProvider | None = provider if isinstance(provider, PushProvider) else None
        if publish_events is None:
            publish_events = self._publish_each
        self._pump = DeltaPump(
            buffer,
            publish_events,
            self._first_token,
            deliver_events,
            self._announce_synced if announce is not None else None,
        )

    async def _publish_each(self, events: Sequence[Event]) -> None:
        """Deltas through ``publish`` one by one, when no batch publish is given."""
        for event in events:
            await self._publish(event.conversation_id, event.frame)

    @property
    def running(self) -> int:
        return len(self._runs)

    @property
    def pending(self) -> int:
        """Replies running or waiting for their conversation's turn."""
        return self._pending

    def get(self, generation_id: str) -> ReplyRun | None:
        return self._runs.get(generation_id)

    def room(self) -> int:
        """How many more questions this instance may take on (its bound minus held)."""
        return self._max_held - self.pending

    def check_capacity(self, conversation_id: str) -> None:
        if self._closing:
            raise ServiceError(
                ErrorCode.UNAVAILABLE, "server is shutting down", retry_after_ms=1000
            )
        if self.pending >= self._max_held:
            raise ServiceError(
                ErrorCode.RATE_LIMITED,
                "this server answers its most questions at once",
                retry_after_ms=1000,
            )
        lane = self._lanes.get(conversation_id)
        if lane is not None and lane.waiting > self._max_queued:
            raise ServiceError(
                ErrorCode.RATE_LIMITED,
                "too many replies pending in this conversation",
                retry_after_ms=1000,
            )

    def start(
        self, conversation: Conversation, message: Message, job: ReplyJob | None = None
    ) -> ReplyRun:
        """Answer ``message``; with its reply job, done once the answer is stored."""
        agent = self._agents.get(conversation.agent_id)
        if agent is None:
            raise ServiceError(
                ErrorCode.INTERNAL, f"agent {conversation.agent_id!r} is not configured"
            )
        route = self._router.choose(agent, message)
        # Derived from the question: a job run twice (claimed, retried, resent) answers
        # under one generation id, the stored answer's idempotency key.
        run = ReplyRun(
            conversation.id,
            agent,
            route.model,
            message,
            self._pump,
            generation_id_for(message.id),
        )
        self._metrics.child(self._metrics.model_routed, agent.id, route.model, route.route).inc()
        if self._cache is not None and agent.cacheable and is_first_turn(message):
            run.cache_key = cache_key(agent, route.model, message.text)
        lane = self._lanes.get(conversation.id)
        if lane is None:
            lane = self._lanes[conversation.id] = _Lane()
        lane.waiting += 1
        self._pending += 1
        if job is not None:
            self.held[job.job_id] = job
        task = asyncio.create_task(self._run(run, lane, job), name=f"reply-{run.generation_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return run

    def cancel_local(self, generation_id: str) -> bool:
        run = self._runs.get(generation_id)
        return run is not None and run.stop(FinishReason.CANCELLED.value)

    async def locate(self, generation_id: str) -> ReplyOwner | None:
        """Who streams this reply: this instance or, through the buffer, another one."""
        run = self._runs.get(generation_id)
        if run is not None:
            return run.owner(self._server_id)
        return await self._buffer.owner_of(generation_id)

    async def cancel(self, owner: ReplyOwner) -> None:
        """Stop a reply wherever it runs: here at once, elsewhere through the broker."""
        if owner.owner == self._server_id or self._send_control is None:
            self.cancel_local(owner.generation_id)
            return
        await self._send_control(owner.owner, CancelReply(owner.generation_id))

    def on_control(self, message: Control) -> None:
        if isinstance(message, CancelReply):
            self.cancel_local(message.generation_id)
        elif isinstance(message, WatchReply):
            self._on_watch(message)
        else:
            for waiter in self._acks.pop(message.generation_id, ()):
                if not waiter.done():
                    waiter.set_result(None)

    def _on_watch(self, message: WatchReply) -> None:
        run = self._live.get(message.generation_id)
        if run is not None and not run.watched:
            self._pump.resync(run)  # the pump announces once the text is recorded
            return
        # Watched already (every delta recorded), or over and stored: Redis is current.
        if self._announce is not None:
            task = asyncio.create_task(self._ack_now(message))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _ack_now(self, message: WatchReply) -> None:
        assert self._announce is not None
        ack = WatchAck(message.conversation_id, message.generation_id, 0)
        await self._announce(message.conversation_id, ack)

    async def _announce_synced(self, run: ReplyRun) -> None:
        assert self._announce is not None
        ack = WatchAck(run.conversation_id, run.generation_id, run.seq)
        await self._announce(run.conversation_id, ack)

    async def join_snapshot(self, conversation_id: str) -> GenerationSnapshot | None:
        """The reply in progress, for a join: every character up to its ``seq`` is in it,
        every later one is published to this instance (the join's floors do the rest)."""
        run = self._live_in.get(conversation_id)
        if run is not None:  # ours: the text is here, the buffer may hold a checkpoint
            return GenerationSnapshot(run.generation_id, run.seq, "".join(run.parts))
        running = await self._buffer.running(conversation_id)
        if running is None or running.watched or running.owner == self._server_id:
            return running.snapshot if running is not None else None
        # Unwatched by another instance: it records nothing per delta. Our watchers entry
        # is in (the join subscribed first), so ask it to record and publish from now on.
        gen = running.snapshot.generation_id
        waiter = asyncio.get_running_loop().create_future()
        self._acks.setdefault(gen, []).append(waiter)
        try:
            if self._send_control is not None:
                await self._send_control(running.owner, WatchReply(conversation_id, gen))
            await asyncio.wait_for(waiter, WATCH_ACK_TIMEOUT_S)
        except TimeoutError:
            log.warning("no watch_ack from %s: joining on its checkpoint", running.owner)
        finally:
            waiters = self._acks.get(gen)
            if waiters is not None and waiter in waiters:
                waiters.remove(waiter)
                if not waiters:
                    del self._acks[gen]
        return await self._buffer.snapshot(conversation_id)

    def running_replies(self) -> list[tuple[str, str]]:
        return [(r.conversation_id, r.generation_id) for r in self._runs.values()]

    async def shutdown(self, grace_s: float) -> None:
        """Let replies finish for ``grace_s``, then end the rest with ``error``."""
        self._closing = True
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace_s)
            if pending:
                for run in list(self._runs.values()):
                    run.stop(FinishReason.ERROR.value)
                await asyncio.wait(pending, timeout=5)

    async def _run(self, run: ReplyRun, lane: _Lane, job: ReplyJob | None) -> None:
        ended = False  # the question has its end (stored, or ended before): the job is done
        try:
            turn = await self._first_turn(job)
            if job is not None and turn is not None:
                # Before the lane, not in it: an older question claimed here later would
                # queue in the lane behind this one while this one waits for it.
                await self._wait_turn(job, turn)
            async with lane.lock:
                ended = await self._answer(run, job, turn)
        except Exception:
            log.exception("reply failed", extra={"conversation": run.conversation_id})
        finally:
            lane.waiting -= 1
            self._pending -= 1
            if lane.waiting == 0 and self._lanes.get(run.conversation_id) is lane:
                del self._lanes[run.conversation_id]
            if job is not None:
                del self.held[job.job_id]
                if ended:
                    await self._job_done(job)
                elif not self._closing:
                    self.retry_jobs.append(job)

    async def _answer(self, run: ReplyRun, job: ReplyJob | None, turn: Turn | None) -> bool:
        """In the lane: the reply, unless answered before; whether the question has its end."""
        if self._closing:
            if job is not None:
                return False  # kept: another instance, or the next start, answers it
            # Never leave an acked question without an end: say why it has no answer.
            restarted = "the server restarted before replying"
            finish = Finish(FinishReason.ERROR.value, Usage(0, 0), restarted)
            await self.store_and_end(run.owner(self._server_id), "", finish)
            return True
        if job is not None and job.claimed:  # a fresh job has not run anywhere before
            if await self._cut_off(run):
                return True  # its owner died mid-reply: the partial text is its answer
            if await self._answered(run):
                return True  # an earlier run of this job (or the orphan sweep) ended it
        await self._stream(run)
        return True

    async def _first_turn(self, job: ReplyJob | None) -> Turn | None:
        """At once, before the lane: marks the job announced (a claimer then knows the
        question was fanned out); a claimed job never announced is announced now."""
        if job is None or self.jobs is None:
            return None
        turn = await self._retrying("check a reply job's turn", self.jobs.turn, job)
        if job.claimed and not turn.announced:
            message = job.message
            await self._publish(message.conversation_id, MessageEvent(message).to_dict())
        return turn

    async def _wait_turn(self, job: ReplyJob, turn: Turn) -> None:
        """Older questions of the conversation first, wherever they are held; past the slot
        wait, go anyway (an answer late is better than none)."""
        assert self.jobs is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._slot_wait_s
        attempt = 0
        cid = job.message.conversation_id
        while not turn.go and loop.time() < deadline and not self._closing:
            attempt += 1
            # Polled (the older job may be anywhere), woken at once when one ends here.
            turned = self._turns.setdefault(cid, asyncio.Event())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(turned.wait(), min(0.5, 0.02 * 2**attempt))
            turn = await self._retrying("check a reply job's turn", self.jobs.turn, job)

    async def _cut_off(self, run: ReplyRun) -> bool:
        """A claimed job whose reply was streaming elsewhere: never a second stream. Ended
        here with its partial text (or by the sweep that wins its claim, or by its owner
        if that one was only slow)."""
        running = await self._buffer.running(run.conversation_id)
        if running is None or running.snapshot.generation_id != run.generation_id:
            return False
        if running.owner == self._server_id:
            return False
        await end_orphan(self._buffer, self.store_and_end, run.conversation_id, run.generation_id)
        return True

    async def _answered(self, run: ReplyRun) -> bool:
        """Whether this question's answer is stored already (the job ran before)."""
        return await self._retrying(
            "look for a stored answer",
            self._conversations.was_answered,
            run.conversation_id,
            run.generation_id,
        )

    async def _job_done(self, job: ReplyJob) -> None:
        assert self.jobs is not None
        try:
            await self._retrying("finish a reply job", self.jobs.done, job)
        except Exception as exc:  # claimed later, it finds its answer stored
            log.warning("reply job not marked done: %s", exc)
        turned = self._turns.pop(job.message.conversation_id, None)
        if turned is not None:
            turned.set()  # the next question of the conversation may go

    async def _stream(self, run: ReplyRun) -> None:
        conversation_id = run.conversation_id
        self._runs[run.generation_id] = run
        self._metrics.active_replies.inc()
        started = time.perf_counter()
        finish: Finish | None = None
        try:
            await self._take_slot(run)
            self._live[run.generation_id] = self._live_in[conversation_id] = run
            start = GenStart(
                conversation_id, run.generation_id, run.reply_to.id, run.agent.id, run.model
            ).to_dict()
            if run.watched or self._deliver_events is None:
                await self._publish(conversation_id, start)
            else:  # no other instance has a member in: a join there reads the buffer
                self._deliver_events([Event(conversation_id, start, time.time())])
            view = await self._conversations.read_window(conversation_id, limit=self._context)
            history = view.messages
            if not history or history[-1].offset < run.reply_to.offset:
                history = (*history, run.reply_to)
            request = ReplyRequest(
                agent_id=run.agent.id,
                model=run.model,
                system_prompt=run.agent.system_prompt,
                history=history,
                temperature=run.agent.temperature,
                max_output_tokens=run.agent.max_output_tokens,
            )
            cached = await self._cached_answer(run)
            attempt = 1
            while True:
                run.done = asyncio.get_running_loop().create_future()
                if cached is not None:
                    replay(cached, run)
                else:
                    start_stream(self.provider, self._push, request, run)
                if run.cancel_reason is not None:  # cancelled while we were setting up
                    run.stop(run.cancel_reason)
                finish = await run.done
                if not self._again(run, finish, attempt):
                    break
                self._metrics.reply_jobs_retried.inc()
                await asyncio.sleep(self._backoff.delay(attempt))
                attempt += 1
                run.rearm()
            if run.failure is not None:
                finish = Finish(FinishReason.ERROR.value, Usage(0, 0), run.failure)
        except Exception as exc:
            log.exception("reply stream failed", extra={"conversation": conversation_id})
            finish = Finish(
                FinishReason.ERROR.value, Usage(0, 0), f"reply failed: {type(exc).__name__}"
            )
        finally:
            if run.handle is not None and not run.ended:
                run.stop(run.cancel_reason or FinishReason.ERROR.value)
            self._runs.pop(run.generation_id, None)
            self._metrics.active_replies.dec()
        if finish is None:
            # Cut short: the provider never reported usage; count what was streamed.
            streamed = Usage(0, count_tokens("".join(run.parts)))
            finish = Finish(
                run.cancel_reason or FinishReason.ERROR.value,
                streamed,
                None
                if run.cancel_reason == FinishReason.CANCELLED.value
                else "the model stream ended without a finish",
            )
        elif (
            run.failure is None
            and run.cancel_reason is not None
            and run.cancel_reason != FinishReason.CANCELLED.value
        ):
            finish = Finish(run.cancel_reason, finish.usage, "server shutting down")
        await self._finalize(run, finish, time.perf_counter() - started)

    def _again(self, run: ReplyRun, finish: Finish | None, attempt: int) -> bool:
        """Another attempt: a retryable model error before any text (nobody saw a word)."""
        return (
            finish is not None
            and finish.retryable
            and attempt < self._attempts
            and not run.parts
            and run.pending is None
            and run.cancel_reason is None
            and run.failure is None
            and not self._closing
        )

    def _first_token(self, run: ReplyRun) -> None:
        assert run.first_token_at is not None
        self._metrics.child(self._metrics.ttft, run.agent.id, run.model).observe(
            run.first_token_at - run.queued_at
        )

    async def _take_slot(self, run: ReplyRun) -> None:
        """One reply per conversation across instances: wait while another one streams."""
        owner = run.owner(self._server_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._slot_wait_s
        delay = 0.02
        while (slot := await self._buffer.begin(owner)) is None:
            if loop.time() > deadline:
                raise ServiceError(ErrorCode.UNAVAILABLE, "another reply is still streaming")
            await asyncio.sleep(delay)  # rare: replies raced on two instances
            delay = min(delay * 2, 0.5)
        run.watched = slot.watched

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
            or finish.reason != FinishReason.STOP.value
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
        # Stored and announced before the buffer goes: an instance dying in between leaves
        # a buffer that another one claims, and its store_and_end finds the message
        # already there (the generation id is the idempotency key): it ends exactly once.
        await self.store_and_end(run.owner(self._server_id), "".join(run.parts), finish)
        try:
            await self._retrying(
                "release the reply buffer",
                self._buffer.end,
                run.conversation_id,
                run.generation_id,
            )
        finally:
            self._drop_live(run)
        tokens = finish.usage.input_tokens + finish.usage.output_tokens
        user_id = run.reply_to.user_id
        if self._on_usage is not None and user_id is not None and tokens:
            try:
                await self._on_usage(user_id, tokens)
            except Exception as exc:  # the quota counter lags; the store has the truth
                log.warning("usage not counted: %s", exc)

    async def store_and_end(self, owner: ReplyOwner, text: str, finish: Finish) -> None:
        """Store the reply like any message, then publish ``gen_end`` with it."""
        conversation_id = owner.conversation_id
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
        try:
            result = await self._retrying("store the reply", self._conversations.append, draft)
            message = result.message
            if result.duplicate:  # ended before (by the owner, or a claim): say it as it was
                reason = message.finish_reason or reason
                error = None if reason != FinishReason.ERROR.value else error
            else:
                self._metrics.child(self._metrics.messages_appended, Role.ASSISTANT.value).inc()
        except ServiceError as exc:
            reason, error = FinishReason.ERROR.value, f"reply not stored: {exc.message}"
        except Exception as exc:  # the clients must still see the reply end
            log.exception("storing a reply failed", extra={"conversation": conversation_id})
            reason, error = FinishReason.ERROR.value, f"reply not stored: {type(exc).__name__}"
        self._metrics.child(self._metrics.replies, reason).inc()
        if reason == FinishReason.ERROR.value:
            self._metrics.reply_jobs_failed.inc()
        tokens = self._metrics.tokens
        self._metrics.child(tokens, owner.model, "input").inc(finish.usage.input_tokens)
        self._metrics.child(tokens, owner.model, "output").inc(finish.usage.output_tokens)
        await self._publish(
            conversation_id,
            GenEnd(
                conversation_id, owner.generation_id, reason, finish.usage, message, error
            ).to_dict(),
        )

    async def _retrying(self, what: str, call: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Ride out a dependency outage (Redis or the store restarting) for a while."""
        delay = 0.05
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _RETRY_FOR_S
        while True:
            try:
                return await call(*args)
            except DEPENDENCY_ERRORS as exc:
                if loop.time() > deadline:
                    raise
                log.warning("could not %s, retrying: %s", what, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def keep_leases(self, lease_s: float, sweep_s: float) -> None:
        """Renew our replies' leases and end orphaned ones, for the life of the app."""
        await keep_leases(self._buffer, self._checkpoint, self.store_and_end, lease_s, sweep_s)

    def _checkpoint(self) -> None:
        """With each heartbeat: unwatched replies' text into the buffer, for a claimer."""
        self._pump.checkpoint(list(self._live.values()))
