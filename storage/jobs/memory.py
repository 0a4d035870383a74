"""Reply jobs in process (embedded mode): one instance, so nothing is ever claimed from a
live holder; the jobs of the previous run are recovered from the store at start-up
(questions without a stored answer, ``recover``) and handed out by ``claim``."""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Iterable

from protocol import Message

from .base import JobStats, ReplyJob, Turn


class MemoryReplyJobs:
    name = "memory"
    shared = False

    def __init__(self) -> None:
        self._jobs: OrderedDict[str, tuple[ReplyJob, float]] = OrderedDict()  # oldest first
        self._by_conversation: dict[str, deque[str]] = {}
        self._orphans: deque[ReplyJob] = deque()  # recovered, not yet claimed
        self._next = 0

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def _put(self, message: Message, claimed: bool) -> ReplyJob:
        self._next += 1
        job = ReplyJob(f"{self._next}", message, claimed)
        self._jobs[job.job_id] = (job, time.monotonic())
        self._by_conversation.setdefault(message.conversation_id, deque()).append(job.job_id)
        return job

    async def add(self, message: Message) -> str:
        # Never suspends: the memory window adds the job in the same step as the append.
        return self._put(message, False).job_id

    def recover(self, questions: Iterable[Message]) -> int:
        """Questions of the previous run that have no answer: jobs for ``claim``."""
        count = 0
        for message in sorted(questions, key=lambda m: (m.conversation_id, m.offset)):
            self._orphans.append(self._put(message, True))
            count += 1
        return count

    async def turn(self, job: ReplyJob) -> Turn:
        queue = self._by_conversation.get(job.message.conversation_id)
        go = not queue or queue[0] == job.job_id
        return Turn(go=go, blocker=None if go or not queue else queue[0])

    async def done(self, job: ReplyJob) -> None:
        if self._jobs.pop(job.job_id, None) is None:
            return
        cid = job.message.conversation_id
        queue = self._by_conversation.get(cid)
        if queue is not None:
            queue.remove(job.job_id)
            if not queue:
                del self._by_conversation[cid]

    async def renew(self) -> None:
        pass  # in process: alive as long as the process is

    async def claim(self, count: int) -> list[ReplyJob]:
        taken: list[ReplyJob] = []
        while self._orphans and len(taken) < count:
            taken.append(self._orphans.popleft())
        return taken

    async def stats(self) -> JobStats:
        if not self._jobs:
            return JobStats(0, 0.0)
        _, since = next(iter(self._jobs.values()))
        return JobStats(len(self._jobs), time.monotonic() - since)
