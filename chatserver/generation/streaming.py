"""A running reply and the pump that turns its chunks into recorded, published deltas.

Providers push chunks into a ``ReplyRun`` (it is their ``ChunkSink``): from the local
provider's shared timer directly, from a pull provider's producer task otherwise. Chunks wait
on the run until the ``DeltaPump`` takes them: one pump per manager, one task while there is
work, so a loop tick's chunks of every running reply become one batch. Each run's waiting
chunks coalesce into one delta.

A *watched* run (another instance has a member in its conversation) has the tick's deltas
recorded in the resume buffer in one step (one Redis round trip for the whole batch) and
only then published, so a client joining mid-reply on any instance finds in the buffer
everything published before its snapshot. An *unwatched* run's deltas go to this instance's
members only, with no Redis command; its text reaches Redis at checkpoints (``checkpoint``,
with the heartbeat) or when a watcher asks (``resync``: the text so far is recorded, then
``watch_ack`` is announced, and from then on the run is watched). Every record of a run
goes through the pump, one batch after another, so they reach Redis in seq order. A run's
end goes through the pump too, behind its last delta, so ``gen_end`` can never overtake a
delta.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from protocol import FinishReason, Message
from protocol.ids import uuid4_str

from ..agents import Agent
from ..fanout.events import DeltaTemplate, Event
from .buffer import PreparedReply, Record, ReplyBuffer, ReplyOwner
from .cache import CacheKey
from .provider import Finish, PushStream

if TYPE_CHECKING:
    from .early import EarlyCall

log = logging.getLogger("chatserver.generation")

Publish = Callable[[str, dict[str, Any]], Awaitable[None]]
PublishEvents = Callable[[Sequence[Event]], Awaitable[None]]  # the broker's publish_many
DeliverEvents = Callable[[Sequence[Event]], None]  # to this instance's members only
Announce = Callable[["ReplyRun"], Awaitable[None]]  # watch_ack, once the text is recorded
OnFirstToken = Callable[["ReplyRun"], None]
# Chunks a run may hold before a pull producer waits for the pump (a push provider never
# runs ahead: it pushes a word per pace, and the pump takes them every tick).
BACKLOG_LIMIT = 256


class ReplyRun:
    __slots__ = (
        "_owner",
        "agent",
        "cache_hit",
        "cache_key",
        "cancel_reason",
        "checkpoint_due",
        "conversation_id",
        "done",
        "early",
        "ended",
        "failure",
        "final",
        "first_token_at",
        "generation_id",
        "handle",
        "job_done",
        "job_id",
        "lost",
        "model",
        "parts",
        "pending",
        "pending_count",
        "prepared",
        "pump",
        "queued_at",
        "reply_to",
        "resync",
        "saved",
        "seq",
        "template",
        "waiter",
        "watched",
    )

    def __init__(
        self,
        conversation_id: str,
        agent: Agent,
        model: str,
        reply_to: Message,
        pump: DeltaPump,
        generation_id: str | None = None,
    ) -> None:
        self.generation_id = generation_id or uuid4_str()
        self.conversation_id = conversation_id
        self.agent = agent
        self.model = model
        self.reply_to = reply_to
        self.pump = pump
        self.seq = 0
        self.template = DeltaTemplate(conversation_id, self.generation_id)
        self.parts: list[str] = []
        # Chunks the pump has not taken yet, joined as they come: a str is no container the
        # garbage collector tracks, a list per delta was (~66,000 a second at 1,000 replies).
        self.pending: str | None = None
        self.pending_count = 0
        self.handle: PushStream | None = None  # the provider stream, once started
        self.done: asyncio.Future[Finish | None] | None = None
        self.ended = False  # the provider finished or was stopped: nothing more comes
        self.final: Finish | None = None  # the provider's finish; None when cut short
        self.waiter: asyncio.Future[None] | None = None  # a pull producer over its backlog
        self.cancel_reason: FinishReason | None = None
        self.failure: str | None = None  # recording or publishing a delta failed
        self.queued_at = time.perf_counter()
        self.first_token_at: float | None = None
        self.lost = False  # another instance took the reply over: end silently
        self.cache_key: CacheKey | None = None  # a cacheable first turn
        self.cache_hit = False
        self._owner: ReplyOwner | None = None
        self.watched = True  # until the slot says otherwise: publish everything
        self.resync = False  # a watcher asked: record the text so far, then announce
        self.checkpoint_due = False  # unwatched: record the text so far with the heartbeat
        self.saved = 0  # how many of ``parts`` the resume buffer holds
        self.job_id: str | None = None  # the reply job this reply answers
        self.job_done = False  # its answer's append finished that job too
        self.prepared: PreparedReply | None = None  # its slot, taken by the question's append
        self.early: EarlyCall | None = None  # its model call, begun beside the append

    def owner(self, server_id: str) -> ReplyOwner:
        owner = self._owner
        if owner is None or owner.owner != server_id:
            owner = self._owner = ReplyOwner(
                self.conversation_id,
                self.generation_id,
                server_id,
                self.agent.id,
                self.model,
                self.reply_to.id,
            )
        return owner

    # -- the provider's sink --------------------------------------------------------

    def chunk(self, text: str) -> None:
        if not text or self.ended:
            return
        pending = self.pending
        if pending is None:
            self.pending = text
            self.pending_count = 1
            self.pump.mark(self)
        else:
            self.pending = pending + text
            self.pending_count += 1

    def finish(self, finish: Finish) -> None:
        self.pump.end(self, finish)

    # -------------------------------------------------------------------------------

    def rearm(self) -> None:
        """Ready for another attempt after a failure before any text: nothing was shown."""
        assert not self.parts and self.pending is None
        self.ended = False
        self.final = None
        self.handle = None
        self.done = None

    def backlog(self) -> int:
        return self.pending_count if self.pending is not None else 0

    def stop(self, reason: FinishReason) -> bool:
        """Cut the reply short (cancel, shutdown, takeover); True if it was still streaming."""
        if self.cancel_reason is None:
            self.cancel_reason = reason
        if self.handle is None or self.ended:
            return False  # not started yet (``start`` checks the reason) or over already
        self.handle.cancel()
        self.pump.end(self, None)
        return True


class DeltaPump:
    """Records and publishes the waiting chunks of every run, a batch per loop tick."""

    def __init__(
        self,
        buffer: ReplyBuffer,
        publish: PublishEvents,
        on_first: OnFirstToken,
        deliver: DeliverEvents | None = None,
        announce: Announce | None = None,
    ) -> None:
        self._buffer = buffer
        self._publish = publish
        self._on_first = on_first
        self._deliver = deliver
        self._announce = announce
        self._dirty: list[ReplyRun] = []  # runs with chunks or an end waiting, in arrival order
        self._task: asyncio.Task[None] | None = None

    def mark(self, run: ReplyRun) -> None:
        self._dirty.append(run)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._drain(), name="delta-pump")

    def resync(self, run: ReplyRun) -> None:
        """A watcher joined on another instance: record and publish from now on."""
        run.watched = True
        run.resync = True
        self.mark(run)

    def checkpoint(self, runs: Sequence[ReplyRun]) -> None:
        """Record the unwatched runs' text so far, and extend every run's entry (the
        heartbeat's upkeep): a watched run records each delta but extends nothing then, and
        one streaming longer than its entry's time to live would lose it. Not an ended
        run's: its answer's append stores the whole text and releases the entry, and a
        record after that finds the entry gone (a reply taken over, it would seem)."""
        for run in runs:
            if not run.ended and (run.watched or run.saved < len(run.parts)):
                run.checkpoint_due = True
                self.mark(run)

    def end(self, run: ReplyRun, finish: Finish | None) -> None:
        """No more chunks for ``run``: resolve its ``done`` once what it has is published."""
        if run.ended:
            return
        run.ended = True
        run.final = finish
        if run.pending is None:  # otherwise marked already: the end rides with its chunks
            self.mark(run)

    async def _drain(self) -> None:
        try:
            while self._dirty:
                runs, self._dirty = self._dirty, []
                try:
                    await self._flush(runs)
                except Exception:  # a bug, not an outage: end the runs rather than hang them
                    log.exception("delta pump failed")
                    for run in runs:
                        run.failure = run.failure or "reply failed: internal error"
                        run.stop(FinishReason.ERROR)
                        _resolve(run)
        finally:
            self._task = None  # the next mark starts a new one

    async def _flush(self, runs: list[ReplyRun]) -> None:
        batch: list[ReplyRun] = []  # watched runs with a delta: recorded, then published
        texts: list[str] = []
        records: list[Record] = []
        synced: list[ReplyRun] = []  # resynced runs: announced once recorded
        local: list[Event] = []  # unwatched runs' deltas: this instance only, no Redis
        for run in runs:
            if run.resync or run.checkpoint_due:
                # Before this tick's delta: the buffer appends in seq order.
                refresh = not run.resync
                if run.resync:
                    synced.append(run)
                run.resync = run.checkpoint_due = False
                records.append(
                    Record(
                        run.conversation_id,
                        run.generation_id,
                        run.seq,
                        "".join(run.parts[run.saved :]),
                        mark_watched=run.watched,
                        refresh=refresh,
                    )
                )
                run.saved = len(run.parts)
            text = run.pending
            if text is None:
                continue  # only its end (or a record) is waiting
            run.pending = None
            if run.waiter is not None:
                waiter, run.waiter = run.waiter, None
                if not waiter.done():
                    waiter.set_result(None)
            if run.cancel_reason is not None:
                continue  # stopped: what came after is dropped, as the client asked
            run.seq += 1
            run.parts.append(text)
            if run.first_token_at is None:
                run.first_token_at = time.perf_counter()
                self._on_first(run)
            if run.watched or self._deliver is None:
                batch.append(run)
                texts.append(text)
                records.append(Record(run.conversation_id, run.generation_id, run.seq, text))
                run.saved = len(run.parts)
                continue
            try:
                local.append(run.template.event(run.seq, text, 0.0))
            except Exception as exc:  # text no codec takes (a lone surrogate): this reply
                log.warning("publishing a delta failed: %s", exc)
                _fail(run, f"reply failed: {type(exc).__name__}")
        if local and self._deliver is not None:
            self._deliver(local)
        if records:
            recorded = {run.generation_id: run for run in runs}
            await self._record_and_publish(batch, texts, records, synced, recorded)
        for run in runs:
            if run.ended and run.pending is None:
                _resolve(run)

    async def _record_and_publish(
        self,
        batch: list[ReplyRun],
        texts: list[str],
        records: list[Record],
        synced: list[ReplyRun],
        recorded: dict[str, ReplyRun],
    ) -> None:
        try:
            lost = await self._buffer.record(records)
        except Exception as exc:  # Redis down: these replies fail, as a failed append did
            log.warning("recording deltas failed: %s", exc)
            for run in (*batch, *synced):
                _fail(run, f"reply failed: {type(exc).__name__}")
            lost = set()
            batch, texts = [], []  # nothing of them is published (zipped below, strictly)
        for generation_id in lost:
            taken = recorded.get(generation_id)
            if taken is not None and not taken.lost:  # a checkpoint or resync found it taken
                log.warning(
                    "reply taken over by another instance",
                    extra={"conversation": taken.conversation_id, "generation": generation_id},
                )
                taken.lost = True
                taken.stop(FinishReason.ERROR)
        if self._announce is not None:
            for run in synced:  # the joining instance may read the buffer now
                try:
                    await self._announce(run)
                except Exception as exc:  # it falls back to the buffer after its timeout
                    log.warning("announcing a watched reply failed: %s", exc)
        events: list[Event] = []
        published: list[ReplyRun] = []
        for run, text in zip(batch, texts, strict=True):
            if lost and run.generation_id in lost:
                continue  # stopped above
            try:
                events.append(run.template.event(run.seq, text, 0.0))
            except Exception as exc:  # text no codec takes (a lone surrogate): this reply
                log.warning("publishing a delta failed: %s", exc)
                _fail(run, f"reply failed: {type(exc).__name__}")
                continue
            published.append(run)
        if not events:
            return
        try:
            await self._publish(events)  # one step for the batch, in order
        except Exception as exc:
            log.warning("publishing deltas failed: %s", exc)
            for run in published:
                _fail(run, f"reply failed: {type(exc).__name__}")


def _fail(run: ReplyRun, why: str) -> None:
    if run.failure is None:
        run.failure = why
    run.stop(FinishReason.ERROR)


def _resolve(run: ReplyRun) -> None:
    done = run.done
    if done is not None and not done.done():  # not done: the reply task may be gone
        done.set_result(run.final)
