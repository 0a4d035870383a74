"""What only the Redis reply jobs do: liveness per instance, claims racing, a restart under
the same id, the registry kept small (a single Redis and a cluster)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from protocol import timestamp_to_ms
from storage.jobs.base import ReplyJob, oldest_first
from storage.jobs.redis import RedisReplyJobs, job_member
from storage.redis_codec import message_payload
from storage.redis_keys import ConversationKeys

if TYPE_CHECKING:
    from conftest import MessageFactory, RedisClients

LEASE_S = 30.0  # nobody dies of slowness here: ``_die`` ends a holder's liveness


async def _jobs(clients: RedisClients, holder: str) -> RedisReplyJobs:
    jobs = RedisReplyJobs(clients.new(), holder=holder, lease_s=LEASE_S, cluster=clients.cluster)
    await jobs.start()
    return jobs


async def _registry(jobs: RedisReplyJobs) -> set[str]:
    """The members of ``jobs``'s registry: the jobs it is listed as holding."""
    return {m.decode() for m in await jobs.redis.smembers(jobs.registry)}


def _members(jobs: list[ReplyJob]) -> set[str]:
    return {job_member(j.message.conversation_id, j.job_id) for j in jobs}


async def _die(jobs: RedisReplyJobs) -> None:
    """What a holder's death comes to for the others: its alive key gone (its lease ran out)."""
    await jobs.redis.delete(jobs.alive_key)


async def _asked(jobs: RedisReplyJobs, new_message: MessageFactory, cid: str) -> ReplyJob:
    message = new_message(cid)
    return ReplyJob(await jobs.add(message), message)


async def test_two_claimers_take_each_job_of_a_dead_holder_once(
    redis_clients: RedisClients, new_message: MessageFactory
) -> None:
    dead = await _jobs(redis_clients, "dead")
    asked = [await _asked(dead, new_message, f"c{i % 5}") for i in range(20)]
    first, second = await _jobs(redis_clients, "b"), await _jobs(redis_clients, "c")
    assert await first.claim(50) == []  # alive
    await _die(dead)
    taken: dict[str, list[ReplyJob]] = {"b": [], "c": []}
    while sum(map(len, taken.values())) < len(asked):
        got = await asyncio.gather(first.claim(7), second.claim(7))
        assert got[0] or got[1], "the dead holder's jobs stopped coming"
        taken["b"] += got[0]
        taken["c"] += got[1]
    ids = [j.job_id for j in taken["b"] + taken["c"]]
    assert sorted(ids) == sorted(j.job_id for j in asked)  # none twice
    assert await first.claim(50) == [] and await second.claim(50) == []
    # Each claimed job is now its claimer's: in its registry, no longer in the dead one's.
    holders = {job: holder for i in range(5) for job, holder in await first.unfinished(f"c{i}")}
    assert holders == {j.job_id: name for name, jobs in taken.items() for j in jobs}
    for claimer in (first, second):
        await claimer.renew()  # a job it lost the race for leaves its registry
        assert await _registry(claimer) == _members(taken[claimer.holder])
    assert not await first.redis.exists(dead.registry)


async def test_a_slow_holder_learns_its_claimed_jobs_are_no_longer_its_own(
    redis_clients: RedisClients, new_message: MessageFactory
) -> None:
    slow = await _jobs(redis_clients, "slow")
    job = await _asked(slow, new_message, "c1")
    other = await _jobs(redis_clients, "other")
    await _die(slow)
    (claimed,) = await other.claim(10)
    assert claimed.job_id == job.job_id and claimed.claimed
    await slow.renew()  # back alive, but the job went to another
    assert await other.unfinished("c1") == [(job.job_id, "other")]
    assert await _registry(slow) == set() and await _registry(other) == _members([job])
    assert (await other.turn(claimed)).go
    await slow.done(job)  # the slow one stored the answer first: the job is done for both
    assert await other.unfinished("c1") == []


async def test_a_restart_under_the_same_id_claims_the_earlier_run_s_jobs_once(
    redis_clients: RedisClients, new_message: MessageFactory
) -> None:
    before = await _jobs(redis_clients, "fixed-id")
    earlier = [await _asked(before, new_message, "c1") for _ in range(2)]
    answered = await _asked(before, new_message, "c2")
    await before.done(answered)
    after = await _jobs(redis_clients, "fixed-id")  # alive at once: no lease to wait for
    fresh = await _asked(after, new_message, "c3")  # this run's own: never claimed
    taken = oldest_first(await after.claim(10))
    assert [j.job_id for j in taken] == [j.job_id for j in earlier]
    assert all(j.claimed for j in taken)
    assert await after.claim(10) == []
    await after.renew()
    assert await _registry(after) == _members([*earlier, fresh])  # the answered one left


async def test_done_jobs_leave_the_registry_with_the_next_renewal(
    redis_clients: RedisClients, new_message: MessageFactory
) -> None:
    jobs = await _jobs(redis_clients, "a")
    done = [await _asked(jobs, new_message, f"c{i}") for i in range(3)]
    kept = await _asked(jobs, new_message, "c0")
    members = {job_member(j.message.conversation_id, j.job_id) for j in [*done, kept]}
    assert {m.decode() for m in await jobs.redis.smembers(jobs.registry)} == members
    for job in done:
        await jobs.done(job)
    assert await jobs.redis.scard(jobs.registry) == 4  # one SREM per renewal, not per job
    await jobs.renew()
    left = {m.decode() for m in await jobs.redis.smembers(jobs.registry)}
    assert left == {job_member("c0", kept.job_id)}


async def test_stats_count_every_holder_s_jobs_and_the_oldest_age(
    redis_clients: RedisClients, new_message: MessageFactory
) -> None:
    a, b = await _jobs(redis_clients, "a"), await _jobs(redis_clients, "b")
    oldest = await _asked(a, new_message, "c1")
    await _asked(b, new_message, "c1")
    await _asked(b, new_message, "c2")
    assert (await a.stats()).outstanding == 1  # b reports with its next renewal
    await b.renew()
    stats = await a.stats()
    assert stats.outstanding == 3
    seconds, micros = await a.redis.time()
    created_ms = timestamp_to_ms(oldest.message.created_at)
    expected = (seconds * 1000 + micros // 1000 - created_ms) / 1000
    assert abs(stats.oldest_age_s - expected) < 5
    await _die(b)  # what is left in a dead holder's registry, until claimed
    assert (await a.stats()).outstanding == 3
    await a.claim(10)
    assert (await a.stats()).outstanding == 3  # all a's now
    await a.claim(10)  # b's registry is empty: b leaves the holders and the reports
    assert not await a.redis.hexists("chat:job_reports", "b")


async def test_jobs_an_older_release_left_in_its_stream_are_claimed_once_stopped(
    redis_clients: RedisClients, new_message: MessageFactory
) -> None:
    """A rolling deploy: questions queued on old instances, in the old jobs stream (renewed
    by idle time), become jobs of today's kind once their holder stops renewing them."""
    jobs = await _jobs(redis_clients, "new")
    redis = jobs.redis
    stream = "chat:jobs"
    await redis.xgroup_create(stream, "repliers", id="0", mkstream=True)
    asked = [new_message("c1"), new_message("c1")]
    legacy = ConversationKeys("chat", "c1").legacy_jobs
    for message in asked:
        fields = {
            "m": message_payload(message),
            "o": message.offset,
            "t": timestamp_to_ms(message.created_at),
        }
        entry = await redis.xadd(stream, fields)
        await redis.xclaim(stream, "repliers", "old", 0, [entry], force=True, justid=True)
        await redis.zadd(legacy, {entry: 2 * message.offset + 1})
    assert await jobs.claim(10) == []  # the old holder renewed them a moment ago
    for entry_id, _ in await redis.xrange(stream):
        await redis.xclaim(stream, "repliers", "old", 0, [entry_id], idle=60_000, justid=True)
    taken = oldest_first(await jobs.claim(10))
    assert [j.message for j in taken] == asked and all(j.claimed for j in taken)
    assert [j.job_id for j in taken] == [m.id for m in asked]
    assert await redis.xlen(stream) == 0 and not await redis.exists(legacy)
    assert (await jobs.turn(taken[0])).go and not (await jobs.turn(taken[1])).go
    assert await jobs.claim(10) == []


async def test_a_job_added_again_is_counted_once(
    redis_clients: RedisClients, new_message: MessageFactory
) -> None:
    """A question's job added a second time (a retried append whose follow may have stood for
    it; a reply that failed on two instances) is one job: once done, its conversation has
    none, and its next question is alone in line again."""
    first, second = await _jobs(redis_clients, "a"), await _jobs(redis_clients, "b")
    message = new_message("c1")
    job = ReplyJob(await first.add(message), message)
    assert await second.add(message) == job.job_id
    keys = ConversationKeys(first.prefix, "c1")
    assert await first.redis.get(keys.jobs_count) == b"1"
    assert (await first.turn(job)).go
    await second.done(job)
    assert not await first.redis.exists(*keys.job_keys())
