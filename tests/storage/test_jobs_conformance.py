"""One suite for every ReplyJobs implementation (the ``jobs_harness`` fixture in conftest)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from storage.jobs.base import ReplyJob, ReplyJobs, Turn

if TYPE_CHECKING:
    from conftest import JobsHarness, MessageFactory


async def _job(jobs: ReplyJobs, message: object) -> ReplyJob:
    from protocol import Message

    assert isinstance(message, Message)
    return ReplyJob(await jobs.add(message), message)


async def _claim_within(
    jobs: ReplyJobs, count: int, want: int = 1, timeout: float = 5.0
) -> list[ReplyJob]:
    """Claim until ``want`` jobs came (each one's lease has to run out first: jobs added a
    few milliseconds apart go idle as far apart), or the timeout."""
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


async def test_the_first_turn_marks_the_job_announced(
    jobs_harness: JobsHarness, new_message: MessageFactory
) -> None:
    jobs = await jobs_harness.make("a")
    job = await _job(jobs, new_message("c1"))
    assert (await jobs.turn(job)).announced is False
    assert (await jobs.turn(job)).announced is True


async def test_a_job_added_announced_is_announced_at_its_first_turn(
    jobs_harness: JobsHarness, new_message: MessageFactory
) -> None:
    """Its question was fanned out with its append: a claimer must not fan it out again."""
    jobs = await jobs_harness.make("a")
    message = new_message("c1")
    job = ReplyJob(await jobs.add(message, announced=True), message)
    turn = await jobs.turn(job)
    assert turn.announced is True and turn.go is True
    await jobs.done(job)
    later = await _job(jobs, new_message("c1"))
    assert (await jobs.turn(later)) == Turn(go=True, announced=False)
    assert (await jobs.stats()).outstanding == 1


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
    job = await _job(holder, new_message("c1"))
    assert await holder.renew([job.job_id, "1-1"]) == [job.job_id]
    assert await other.claim(10) == []


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
    assert [j.message for j in taken] == [j.message for j in queued]
    assert all(j.claimed for j in taken)
    assert (await new.turn(taken[0])).go is True
    assert (await new.turn(taken[1])).go is False
    ids = sorted(j.job_id for j in taken)
    assert sorted(await new.renew(ids)) == ids
    for job in taken:
        await new.done(job)
    assert (await new.stats()).outstanding == 0
