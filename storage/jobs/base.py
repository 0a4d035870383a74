"""Reply jobs: every acknowledged question that needs an answer holds one until answered.

A job is written in the same atomic step as the question's append (the window's script on
one Redis, the memory window's append in process), so an ack always has a job behind it.
The instance that accepted the question holds the job and runs its reply, and keeps itself
alive (``renew``) while it runs. When an instance dies, its liveness runs out and any other
instance claims its jobs (``claim``), so a queued question is never left unanswered.

Order within a conversation: a job runs only when no older job of its conversation is
unfinished (``turn``), whichever instance holds which.

Exactly one answer is not the jobs' business: the reply's generation id is derived from the
question's id, and the answer is stored with it as its idempotency key, so a job run twice
(claimed from a slow holder, retried) stores one answer.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from protocol import Message
from protocol.record import record


@record
class ReplyJob:
    job_id: str
    message: Message  # the question
    claimed: bool = False  # taken over from a holder that died (or from before a restart)
    first: bool = False  # its append found no older job listed: no turn to ask for


@record
class Turn:
    go: bool  # no older job of the conversation is unfinished
    blocker: str | None = None  # when it may not go: the older job holding it back


@dataclass(frozen=True, slots=True)
class JobStats:
    outstanding: int  # jobs not done, on every instance (queued and running)
    oldest_age_s: float  # age of the oldest one (0 when none)


class ReplyJobs(Protocol):
    name: str
    shared: bool  # held in a service every instance reaches (Redis)

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def add(self, message: Message) -> str:
        """A job for this question, held by this instance (its windows add theirs in the
        append itself; this is for the rest: tests, tools)."""
        ...

    async def turn(self, job: ReplyJob) -> Turn:
        """Whether the job may run now."""
        ...

    async def done(self, job: ReplyJob) -> None:
        """The question is answered: the job is never handed out again."""
        ...

    async def renew(self) -> None:
        """This instance is alive for one more lease (called every third of one), at a cost
        that does not grow with the jobs it holds."""
        ...

    async def claim(self, count: int) -> list[ReplyJob]:
        """At most ``count`` jobs whose holder's liveness ran out (or, once after a start,
        jobs this instance's id held before: a restart under the same id), now held here."""
        ...

    async def stats(self) -> JobStats: ...

    def recover(self, questions: Iterable[Message]) -> int:
        """Jobs for the previous run's unanswered questions (``Store.unanswered``), when the
        jobs themselves did not outlive it (``shared`` is False); how many."""
        ...


def oldest_first(jobs: Sequence[ReplyJob]) -> list[ReplyJob]:
    """Claimed jobs in their conversations' order (offsets), whatever order they came in."""
    return sorted(jobs, key=lambda j: (j.message.conversation_id, j.message.offset))
