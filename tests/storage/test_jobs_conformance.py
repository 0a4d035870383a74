"""One suite for every ReplyJobs implementation (the ``jobs_harness`` fixture in conftest)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from storage.jobs.base import ReplyJob, ReplyJobs, oldest_first

if TYPE_CHECKING:
    from conftest import JobsHarness, MessageFactory


async def _job(jobs: ReplyJobs, message: object) -> ReplyJob:
    from protocol import Message

    assert isinstance(message, Message)
    return ReplyJob(await jobs.add(message), message)


async def _claim_within(
    jobs: ReplyJobs, count: int, want: int = 1, timeout: float = 5.0
) -> list[ReplyJob]:
    """Claim until ``want`` jobs came (the holder's liveness has to run out first), or the
    timeout."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    taken: list[ReplyJob] = []
    while True:
        taken += await jobs.claim(count - len(taken))
        if len(taken) >= want or loop.time() > deadline:
            return taken
        await asyncio.sleep(0.05)


async def test_jobs_of_a_conversation_take_turns_in_order(
    jobs_harness: JobsHarness, new_message: MessageFactory
) -> None:
    jobs = await jobs_harness.make("a")
    first = await _job(jobs, new_message("c1"))
    second = await _job(jobs, new_message("c1"))
    other = await _job(jobs, new_message("c2"))
    assert first.job_id != second.job_id
    held_back = await jobs.turn(second)
    assert held_back.go is False  # the older question goes first
    assert held_back.blocker == first.job_id  # and says which one holds it back
    assert (await jobs.turn(first)).go is True
    assert (await jobs.turn(first)).blocker is None
    assert (await jobs.turn(other)).go is True  # another conversation is not held back
    await jobs.done(first)
    assert (await jobs.turn(second)).go is True
    await jobs.done(second)
    await jobs.done(second)  # twice is harmless


async def test_stats_count_outstanding_jobs(
    jobs_harness: JobsHarness, new_message: MessageFactory
) -> None:
    jobs = await jobs_harness.make("a")
    empty = await jobs.stats()
    assert (empty.outstanding, empty.oldest_age_s) == (0, 0)
    one = await _job(jobs, new_message("c1"))
    await _job(jobs, new_message("c2"))
    stats = await jobs.stats()
    assert stats.outstanding == 2 and stats.oldest_age_s >= 0
    await jobs.done(one)
    assert (await jobs.stats()).outstanding == 1


async def test_a_live_holders_jobs_are_not_claimed(
    jobs_harness: JobsHarness, new_message: MessageFactory
) -> None:
    holder = await jobs_harness.make("a")
    other = await jobs_harness.make("b")
    await _job(holder, new_message("c1"))
    await holder.renew()
    assert await other.claim(10) == []
    assert (await holder.stats()).outstanding == 1  # still its own


async def test_a_dead_holders_unfinished_jobs_are_claimed_once(
    jobs_harness: JobsHarness, new_message: MessageFactory
) -> None:
    old = await jobs_harness.make("a")
    answered = await _job(old, new_message("c1"))
    queued = [await _job(old, new_message("c1")) for _ in range(2)]
    await old.done(answered)
    new = await jobs_harness.make("b")
    await jobs_harness.die(old, new, [j.message for j in queued])
    taken = await _claim_within(new, 10, want=len(queued))
    taken += await new.claim(10)  # nothing twice
    taken = oldest_first(taken)
    assert [j.message for j in taken] == [j.message for j in queued]
    assert all(j.claimed for j in taken)
    assert (await new.turn(taken[0])).go is True
    assert (await new.turn(taken[1])).go is False
    await new.renew()
    assert (await new.stats()).outstanding == len(queued)
    for job in taken:
        await new.done(job)
    assert (await new.stats()).outstanding == 0


async def test_a_job_waits_for_the_oldest_unfinished_one_whatever_finished_between(
    jobs_harness: JobsHarness, new_message: MessageFactory
) -> None:
    jobs = await jobs_harness.make("a")
    queued = [await _job(jobs, new_message("c1")) for _ in range(5)]
    await jobs.done(queued[1])  # finished out of order (its answer came from elsewhere)
    await jobs.done(queued[3])
    assert (await jobs.turn(queued[4])).blocker == queued[0].job_id
    await jobs.done(queued[0])
    assert (await jobs.turn(queued[4])).blocker == queued[2].job_id
    assert (await jobs.turn(queued[2])).go
    await jobs.done(queued[2])
    assert (await jobs.turn(queued[4])).go
    assert (await jobs.stats()).outstanding == 1
