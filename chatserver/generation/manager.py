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
import time
from collections.abc import Sequence
from dataclasses import replace
from functools import partial

from protocol import (
    ErrorCode,
    FinishReason,
    GenStart,
    Message,
    Usage,
)
from protocol.backoff import Backoff
from storage.jobs.base import ReplyJob, ReplyJobs
from storage.records import Conversation

from ..agents import Agent, AgentCatalog
from ..conversations import ConversationService
from ..errors import ServiceError
from ..fanout.events import Event
from ..ops.metrics import Metrics
from .buffer import PreparedReply, ReplyBuffer
from .cache import ResponseCache, cache_key
from .early import EarlyCall, reply_request
from .jobs import generation_id_for
from .leases import keep_leases
from .local import count_tokens
from .manager_early import _EarlySteps
from .manager_finishing import _Finishing
from .manager_job_steps import _JobSteps
from .manager_remote import _Remote
from .manager_slot import _SlotSteps
from .manager_state import (
    Announce,
    Lane,
    OnUsage,
    SendControl,
    log,
)
from .provider import Finish, Provider, PushProvider
from .routing import Router, is_first_turn
from .sources import replay, start_stream
from .streaming import DeliverEvents, DeltaPump, Publish, PublishEvents, ReplyRun
from .turn_queue import TurnQueue

__all__ = ["GenerationManager", "ReplyRun"]


class GenerationManager(_Remote, _JobSteps, _SlotSteps, _Finishing, _EarlySteps):
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
        early_calls: bool = True,
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
        self._lanes: dict[str, Lane] = {}
        self._pending = 0
        # The questions waiting here for their turn, by conversation, oldest first.
        self._waiting_turn: dict[str, TurnQueue] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False
        self._early_calls = early_calls  # begin_early (manager_early.py)
        self._early_open = 0  # early calls not adopted or cancelled yet
        self._no_early: dict[str, float] = {}  # users without early calls, until (loop time)
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
        """How many more questions this instance may take on (its bound minus held): none
        once it stops (a job claimed then would wait for its next claimer)."""
        if self._closing:
            return 0
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
        self,
        conversation: Conversation,
        message: Message,
        job: ReplyJob | None = None,
        followed: object = None,
        *,
        prepared: PreparedReply | None = None,
        early: EarlyCall | None = None,
    ) -> None:
        """Answer ``message``; with its reply job, done once the answer is stored.
        ``followed``: what the question's append follow returned (``append_follow``);
        ``prepared``: the slot, taken already (a sweep running a reply again); ``early``:
        the model call begun beside the append (``begin_early``), for the run to adopt."""
        agent = self._agents.get(conversation.agent_id)
        if agent is None:
            if early is not None:
                early.cancel()
            raise ServiceError(
                ErrorCode.INTERNAL, f"agent {conversation.agent_id!r} is not configured"
            )
        lane = self._lanes.get(conversation.id)
        if lane is None:
            lane = self._lanes[conversation.id] = Lane()
        lane.waiting += 1
        self._pending += 1
        if job is not None:
            self.held[job.job_id] = job
        if followed is not None:
            prepared = self._buffer.prepared(followed)
        # Behind an older question waiting here, a question is parked: its reply is made
        # when its turn is near, not now.
        if job is not None and prepared is None:
            begin = partial(self._begin, conversation, agent, message, lane, job, None)
            if self._park(job, begin):
                if early is not None:  # its turn is not now: the context will have moved
                    early.cancel()
                return
        self._begin(conversation, agent, message, lane, job, prepared, early=early)

    def _begin(
        self,
        conversation: Conversation,
        agent: Agent,
        message: Message,
        lane: Lane,
        job: ReplyJob | None,
        prepared: PreparedReply | None,
        parked: tuple[asyncio.Event, float] | None = None,
        *,
        early: EarlyCall | None = None,
    ) -> None:
        """The reply's run and its task (``parked``: a parked question's wake-up and
        deadline; ``early``: its model call, begun already)."""
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
        if job is not None:
            run.job_id = job.job_id
        run.prepared = prepared
        run.early = early
        task = asyncio.create_task(
            self._run(run, lane, job, parked), name=f"reply-{run.generation_id}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def running_replies(self) -> list[tuple[str, str]]:
        return [(r.conversation_id, r.generation_id) for r in self._runs.values()]

    async def shutdown(self, grace_s: float) -> None:
        """Let replies finish for ``grace_s``, then end the rest with ``error``."""
        self._closing = True
        for waiting in self._waiting_turn.values():  # questions asleep behind older ones
            waiting.wake_all()
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace_s)
            if pending:
                for run in list(self._runs.values()):
                    run.stop(FinishReason.ERROR)
                await asyncio.wait(pending, timeout=5)

    async def _stream(self, run: ReplyRun) -> None:
        conversation_id = run.conversation_id
        self._runs[run.generation_id] = run
        self._metrics.active_replies.inc()
        started = time.perf_counter()
        finish: Finish | None = None
        try:
            history = await self._slot_and_context(run)
            self._live[run.generation_id] = self._live_in[conversation_id] = run
            start = GenStart(
                conversation_id,
                run.generation_id,
                run.reply_to.id,
                run.agent.id,
                run.model,
                thinking=self.provider.thinks(run.model, run.agent.thinking_budget),
            ).to_dict()
            if run.watched or self._deliver_events is None:
                await self._publish(conversation_id, start)
            else:  # no other instance has a member in: a join there reads the buffer
                self._deliver_events([Event(conversation_id, start, time.time())])
            request = reply_request(run.agent, run.model, history)
            cached = await self._cached_answer(run)
            early, run.early = run.early, None
            attempt = 1
            while True:
                run.done = asyncio.get_running_loop().create_future()
                if cached is not None:
                    replay(cached, run)
                elif early is None or not early.adopt(run, request):
                    start_stream(self.provider, self._push, request, run)
                if early is not None:
                    early.cancel()  # when not adopted (a cached answer): a no-op else
                    early = None
                if run.cancel_reason is not None:  # cancelled while we were setting up
                    run.stop(run.cancel_reason)
                finish = await run.done
                if not self._again(run, finish, attempt):
                    break
                self._metrics.reply_jobs_retried.inc()
                await asyncio.sleep(self._backoff.delay(attempt))
                attempt += 1
                run.rearm()
            if attempt > 1 and finish is not None and finish.error is not None:
                # The provider's text tells of its last attempt only: say there were more.
                finish = replace(finish, error=f"{finish.error} (reply tried {attempt} times)")
            if run.failure is not None:
                finish = Finish(FinishReason.ERROR, Usage(0, 0), run.failure)
        except Exception as exc:
            log.exception(
                "reply stream failed",
                extra={"conversation": conversation_id, "generation": run.generation_id},
            )
            finish = Finish(FinishReason.ERROR, Usage(0, 0), f"reply failed: {type(exc).__name__}")
        finally:
            if run.handle is not None and not run.ended:
                run.stop(run.cancel_reason or FinishReason.ERROR)
            self._runs.pop(run.generation_id, None)
            self._metrics.active_replies.dec()
        if finish is None:
            # Cut short: the provider never reported usage; count what was streamed.
            streamed = Usage(0, count_tokens("".join(run.parts)))
            finish = Finish(
                run.cancel_reason or FinishReason.ERROR,
                streamed,
                None
                if run.cancel_reason == FinishReason.CANCELLED
                else "the model stream ended without a finish",
            )
        elif (
            run.failure is None
            and run.cancel_reason is not None
            and run.cancel_reason != FinishReason.CANCELLED
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

    async def keep_leases(self, lease_s: float, sweep_s: float) -> None:
        """Renew our replies' leases and end orphaned ones, for the life of the app."""
        await keep_leases(
            self._buffer,
            self._checkpoint,
            self.store_and_end,
            lease_s,
            sweep_s,
            rerun_unstarted=self._rerun_unstarted,
            rerun=self.rerun,
        )

    def _checkpoint(self) -> None:
        """With each heartbeat: unwatched replies' text into the buffer, for a claimer."""
        self._pump.checkpoint(list(self._live.values()))
