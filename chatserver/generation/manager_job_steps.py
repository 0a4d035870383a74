"""A reply's task and its durable job, step by step: its first turn, parked or waiting for
its turn in the conversation's order, a reply cut off by its owner's death, an answer already
stored, done.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from protocol import FinishReason, Usage
from storage.jobs.base import ReplyJob, Turn

from .leases import end_orphan
from .manager_state import (
    LOCAL_TURN_WAIT_S,
    SLOT_POLL,
    Lane,
    ManagerState,
    log,
    reply_ids,
)
from .provider import Finish
from .streaming import ReplyRun
from .turn_queue import TurnQueue


class _JobSteps(ManagerState):
    async def _run(
        self,
        run: ReplyRun,
        lane: Lane,
        job: ReplyJob | None,
        parked: tuple[asyncio.Event, float] | None = None,
    ) -> None:
        ended = False  # the question has its end (stored, or ended before): the job is done
        # The slot its question's append took stands for its job (a sweep runs it should
        # this instance stop): one that fails before its end becomes a job here.
        slot_job = job is None and run.prepared is not None
        try:
            # A parked question is the oldest waiting here now: it asks Redis itself.
            turn = Turn(go=False) if parked is not None else await self._first_turn(job)
            if job is not None and turn is not None:
                # Before the lane, not in it: an older question claimed here later would
                # queue in the lane behind this one while this one waits for it.
                await self._wait_turn(job, turn, parked)
            if run.prepared is not None and run.prepared.taken_over:
                # It holds the slot: whatever waits in the lane waits for it, and the lane
                # would have it wait for them (until the slot's time to live ran out).
                ended = await self._answer(run, job)
            else:
                async with lane.lock:
                    ended = await self._answer(run, job)
        except Exception:
            log.exception(
                "reply failed",
                extra={"conversation": run.conversation_id, "generation": run.generation_id},
            )
        finally:
            if run.early is not None:  # never streamed (answered before, stopping, failed)
                run.early.cancel()
                run.early = None
            lane.waiting -= 1
            self._pending -= 1
            if lane.waiting == 0 and self._lanes.get(run.conversation_id) is lane:
                del self._lanes[run.conversation_id]
            if job is not None:
                del self.held[job.job_id]
                if ended:
                    await self._job_done(job, finished=run.job_done)
                elif not self._closing:
                    self.retry_jobs.append(job)
                    # A question parked behind it waits for a wake-up, not a deadline.
                    self._wake_turn(run.conversation_id)
            elif slot_job and not ended and not self._closing:
                retry = await self._job_for(run)
                if retry is not None:
                    self.retry_jobs.append(retry)

    async def _answer(self, run: ReplyRun, job: ReplyJob | None) -> bool:
        """In the lane: the reply, unless answered before; whether the question has its end."""
        if self._closing:
            if job is not None or run.prepared is not None:
                # Kept: another instance (claim or sweep), or the next start.
                log.warning("a reply left to run after this instance stops", extra=reply_ids(run))
                return False
            # Never leave an acked question without an end: say why it has no answer.
            restarted = "the server restarted before replying"
            finish = Finish(FinishReason.ERROR, Usage(0, 0), restarted)
            await self.store_and_end(run.owner(self._server_id), "", finish)
            return True
        if job is not None and job.claimed:  # a fresh job has not run anywhere before
            if await self._cut_off(run):
                return True  # its owner died mid-reply: the partial text is its answer
            if await self._answered(run):
                return True  # an earlier run of this job (or the orphan sweep) ended it
        await self._stream(run)
        # Taken over (its entry gone or another's): whoever took it ends it, and the job, run
        # again, finds that end; if nobody did (the entry expired), the job answers.
        return not run.lost

    async def _first_turn(self, job: ReplyJob | None) -> Turn | None:
        """At once, before the lane. A job its append found first in line asks nothing: it
        goes (a claimed one asks: the conversation may have moved on since). Behind an older
        question waiting here it waits too: a long queue asks Redis once, not per question."""
        if job is None or self.jobs is None:
            return None
        if job.first and not job.claimed:
            return Turn(go=True)
        waiting = self._waiting_turn.get(job.message.conversation_id)
        oldest = None if waiting is None or job.claimed else waiting.oldest()
        if oldest is not None and oldest < job.message.offset:
            return Turn(go=False)  # an older one waits here and asks: no need to ask now
        return await self._retrying("check a reply job's turn", self.jobs.turn, job)

    def _park(self, job: ReplyJob, begin: Callable[[tuple[asyncio.Event, float]], None]) -> bool:
        """Queue a question behind an older one waiting here, with no reply or task yet:
        ``begin((woken, deadline))`` makes them when it is the oldest. Whether it was parked
        (else its task asks as usual)."""
        if self.jobs is None or job.first or job.claimed or self._closing:
            return False
        cid, offset = job.message.conversation_id, job.message.offset
        waiting = self._waiting_turn.get(cid)
        oldest = None if waiting is None else waiting.oldest()
        if waiting is None or oldest is None or oldest > offset:
            return False
        deadline = asyncio.get_running_loop().time() + self._slot_wait_s
        waiting.park(offset, lambda woken: begin((woken, deadline)))
        return True

    async def _wait_turn(
        self,
        job: ReplyJob,
        turn: Turn,
        parked: tuple[asyncio.Event, float] | None = None,
    ) -> None:
        """Older questions of the conversation first, wherever they are held; past the slot
        wait, go anyway (an answer late is better than none).

        Only the oldest question waiting here asks Redis again, and it polls only while the
        job holding it back is held elsewhere: one held here wakes it when it ends. The
        younger ones sleep until they are the oldest (each would only learn that the one
        before it has not ended), most of them parked with no task (``_park``): a queue of
        n costs a few checks per question, not n. ``parked``: the wake-up and deadline of
        a parked one, started now that it is the oldest."""
        assert self.jobs is not None
        loop = asyncio.get_running_loop()
        delays = SLOT_POLL.delays()
        cid = job.message.conversation_id
        offset = job.message.offset
        waiting = self._waiting_turn.get(cid)
        if waiting is None:
            waiting = self._waiting_turn[cid] = TurnQueue()
        if parked is None:
            deadline = loop.time() + self._slot_wait_s
            woken = waiting.add(offset)
        else:
            woken, deadline = parked
        # One timer a question for its deadline, not one per sleep: most of a long queue
        # sleeps until it is the oldest.
        expiry = loop.call_at(deadline, woken.set)
        try:
            while not turn.go and loop.time() < deadline and not self._closing:
                if offset != waiting.oldest():
                    await woken.wait()  # its deadline, an end here, or the one before gave up
                else:
                    if turn.blocker is None or turn.blocker not in self.held:
                        pause = next(delays)
                    else:  # only bounds the wait should the wake-up never come
                        pause = LOCAL_TURN_WAIT_S
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(pause):  # not wait_for: see ops/observe.py
                            await woken.wait()
                woken.clear()  # after the wait: a wake-up during the check below is kept
                turn = await self._retrying("check a reply job's turn", self.jobs.turn, job)
        finally:
            expiry.cancel()
            waiting.remove(offset)
            if not waiting:
                if self._waiting_turn.get(cid) is waiting:
                    del self._waiting_turn[cid]
            elif not turn.go:  # it leaves without its turn (stopping, failing): the next
                self._wake_turn(cid)  # oldest takes over the watch

    def _wake_turn(self, conversation_id: str) -> None:
        """The oldest question waiting here in the conversation checks its turn again."""
        waiting = self._waiting_turn.get(conversation_id)
        if waiting is not None:
            waiting.wake_oldest()

    @property
    def _rerun_unstarted(self) -> bool:
        """Every question has a job any live instance claims: a reply of which nothing was
        recorded when its owner died is run again, not ended with nothing."""
        return self.jobs is not None and self.jobs.shared

    async def _cut_off(self, run: ReplyRun) -> bool:
        """A claimed job whose reply was streaming elsewhere: never a second stream. Ended
        here with its partial text (or by the sweep that wins its claim, or by its owner
        if that one was only slow). One of which nothing was recorded is taken over and run
        here instead (False), unless its owner lives."""
        cid, gid = run.conversation_id, run.generation_id
        running = await self._buffer.running(cid)
        if running is None or running.snapshot.generation_id != gid:
            return False
        if running.mine:
            return False
        snapshot = running.snapshot
        if self._rerun_unstarted and snapshot.seq == 0 and not snapshot.text:
            if await self._buffer.claim(cid, gid) is not None:
                return False  # its slot is free: run it afresh
            # Lost the claim: to a live owner (it answers), or to a sweep (then it is gone,
            # and an answer is stored, or none when it too found nothing recorded).
            again = await self._buffer.running(cid)
            if again is None or again.snapshot.generation_id != gid:
                return False
            log.warning("a claimed job's reply runs on a live instance", extra=reply_ids(run))
            return True
        await end_orphan(self._buffer, self.store_and_end, cid, gid)
        return True

    async def _answered(self, run: ReplyRun) -> bool:
        """Whether this question's answer is stored already (the job ran before)."""
        return await self._retrying(
            "look for a stored answer",
            self._conversations.was_answered,
            run.conversation_id,
            run.generation_id,
        )

    async def _job_done(self, job: ReplyJob, *, finished: bool = False) -> None:
        """Done (``finished``: by the answer's own append), and the next one may go."""
        assert self.jobs is not None
        try:
            if not finished:
                await self._retrying("finish a reply job", self.jobs.done, job)
        except Exception as exc:  # claimed later, it finds its answer stored
            log.warning("reply job not marked done: %s", exc)
        self._wake_turn(job.message.conversation_id)  # the next question may go
