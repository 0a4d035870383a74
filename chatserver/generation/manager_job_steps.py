"""A reply's durable job, step by step: its first turn, waiting for its turn in the
conversation's order, a reply cut off by its owner's death, an answer already stored, done.
"""

from __future__ import annotations

import asyncio
import contextlib

from storage.jobs.base import ReplyJob, Turn

from .leases import end_orphan
from .manager_state import (
    LOCAL_TURN_WAIT_S,
    SLOT_POLL,
    ManagerState,
    log,
)
from .streaming import ReplyRun
from .turn_queue import TurnQueue


class _JobSteps(ManagerState):
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

    async def _wait_turn(self, job: ReplyJob, turn: Turn) -> None:
        """Older questions of the conversation first, wherever they are held; past the slot
        wait, go anyway (an answer late is better than none).

        Only the oldest question waiting here asks Redis again, and it polls only while the
        job holding it back is held elsewhere: one held here wakes it when it ends. The
        younger ones sleep until they are the oldest (each would only learn that the one
        before it has not ended): a queue of n costs a few checks per question, not n."""
        assert self.jobs is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._slot_wait_s
        delays = SLOT_POLL.delays()
        cid = job.message.conversation_id
        offset = job.message.offset
        waiting = self._waiting_turn.get(cid)
        if waiting is None:
            waiting = self._waiting_turn[cid] = TurnQueue()
        woken = waiting.add(offset)
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
        if running.owner == self._server_id:
            return False
        snapshot = running.snapshot
        if self._rerun_unstarted and snapshot.seq == 0 and not snapshot.text:
            if await self._buffer.claim(cid, gid) is not None:
                return False  # its slot is free: run it afresh
            # Lost the claim: to a live owner (it answers), or to a sweep (then it is gone,
            # and an answer is stored, or none when it too found nothing recorded).
            again = await self._buffer.running(cid)
            return again is not None and again.snapshot.generation_id == gid
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
