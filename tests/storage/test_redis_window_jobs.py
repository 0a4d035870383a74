"""The window's append and its question's reply job, in the same step: added, finished by the
answer, or stood for by a follow (the reply's slot taken); a script redis-py sent again after
its reply was lost (a single Redis and a cluster where a test says so)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

from storage import MessageDraft
from storage.jobs.redis import RedisReplyJobs
from storage.outbox.redis import RedisOutbox
from storage.redis_keys import ConversationKeys
from storage.window.redis import RedisWindow

from .test_redis_window import CID, _no_head, draft, make_pair

if TYPE_CHECKING:
    from conftest import RedisClients


async def _window_with_jobs(redis: Any) -> tuple[RedisWindow, RedisOutbox, RedisReplyJobs]:
    """A window on one Redis, its outbox and reply jobs (holder ``w1``), started."""
    window = RedisWindow(redis, size=10, fanout_head=_no_head)
    outbox = RedisOutbox(redis, consumer="c")
    jobs = RedisReplyJobs(redis, holder="w1")
    await outbox.start()
    await jobs.start()
    return window, outbox, jobs


def _run_twice(script: Any) -> Any:
    """``script`` as redis-py retries it when the reply to its first run was lost."""

    async def twice(*args: object, **kwargs: object) -> object:
        await script(*args, **kwargs)  # ran, but its reply never came back
        return await script(*args, **kwargs)

    return twice


async def test_a_retried_script_is_our_own_append_not_a_duplicate(redis_url: str) -> None:
    """redis-py resends a script whose reply was lost; the first run already appended (and
    added the question's job, which the caller must run: nothing else would)."""
    from redis.asyncio import Redis

    redis = Redis.from_url(redis_url)
    try:
        window, outbox, jobs = await _window_with_jobs(redis)
        await window.rebuild("conv", [], 0)
        script = window._append_script
        window._append_script = _run_twice(script)  # type: ignore[method-assign]
        draft = MessageDraft("conv", "user", "hi", user_id="u", client_msg_id="m1")
        result = await window.append(draft, outbox, jobs=jobs)
        assert not result.duplicate  # the caller still fans it out and starts the reply
        assert result.job_id == result.message.id and not result.job_first
        assert (await jobs.stats()).outstanding == 1
        window._append_script = script  # type: ignore[method-assign]
        again = await window.append(draft, outbox)
        assert again.duplicate and again.message.id == result.message.id
        assert await outbox.backlog() == 1
    finally:
        await redis.aclose()


async def test_a_retried_script_whose_follow_stood_for_the_job_adds_the_job(
    redis_url: str,
) -> None:
    """The first run's follow stood for the question's job (none added) and its reply was
    lost: the caller, told only that the append was its own, runs a job, so the job is
    added then, once."""
    from redis.asyncio import Redis

    from storage.window.base import AppendFollow

    redis = Redis.from_url(redis_url)
    try:
        window, outbox, jobs = await _window_with_jobs(redis)
        await window.rebuild(CID, [], 0)
        keys = ConversationKeys(window.prefix, CID)
        probe = keys.base + ":probe"
        await redis.set(probe, "seen")
        composed = window._composed_script

        def retried(gate: str | None, follow: str | None) -> Any:
            return _run_twice(composed(gate, follow))  # its follow ran the first time too

        window._composed_script = retried  # type: ignore[method-assign]

        def follow(question_id: str) -> AppendFollow:
            return AppendFollow(_ECHO_FOLLOW, (probe, keys.base + ":out"), ("x",))

        result = await window.append(draft("one", key="q1"), outbox, jobs=jobs, follow=follow)
        assert await redis.get(keys.base + ":out") == b"x"  # the first run's follow ran
        assert not result.duplicate and result.followed is None
        assert result.job_id == result.message.id
        assert await jobs.unfinished(CID) == [(result.job_id, "w1")]  # held here
        assert await redis.get(keys.jobs_count) == b"1"
    finally:
        await redis.aclose()


async def test_an_answer_finishes_its_question_s_job_in_its_own_step(
    redis_clients: RedisClients,
) -> None:
    """The answer's append finishes the job it answers (no second call), on a cluster too:
    the conversation's jobs share its slot."""
    from storage.jobs.redis import RedisReplyJobs, job_member

    window, outbox = await make_pair(redis_clients, fanout_head=_no_head)
    jobs = RedisReplyJobs(window.redis, holder="w1", cluster=redis_clients.cluster)
    await jobs.start()
    await window.rebuild(CID, [], 0)
    asked = await window.append(draft("a question", key="q1"), outbox, jobs=jobs)
    assert asked.job_id == asked.message.id and not asked.job_done
    assert (await jobs.stats()).outstanding == 1
    member = job_member(CID, asked.job_id)
    assert await window.redis.sismember(jobs.registry, member)  # listed as this holder's
    answer = MessageDraft(
        conversation_id=CID, role="assistant", text="an answer", client_msg_id="gen-1"
    )
    answered = await window.append(answer, outbox, jobs=jobs, answers=asked.job_id)
    assert answered.job_id is None  # an answer adds no job of its own
    assert answered.job_done
    assert (await jobs.stats()).outstanding == 0
    assert not await window.redis.exists(*ConversationKeys(window.prefix, CID).job_keys())
    again = await window.append(answer, outbox, jobs=jobs, answers=asked.job_id)
    assert again.duplicate and not again.job_done  # a resent answer finishes nothing
    await jobs.renew()  # done jobs leave the registry with the next renewal
    assert not await window.redis.sismember(jobs.registry, member)
    await jobs.close()


async def test_a_question_with_no_older_job_listed_is_first_in_line(
    redis_clients: RedisClients,
) -> None:
    """The append tells whether an older job of the conversation is unfinished: a question
    alone in line needs no turn check."""
    from storage.jobs.base import ReplyJob
    from storage.jobs.redis import RedisReplyJobs

    window, outbox = await make_pair(redis_clients, fanout_head=_no_head)
    jobs = RedisReplyJobs(window.redis, holder="w1", cluster=redis_clients.cluster)
    await jobs.start()
    await window.rebuild(CID, [], 0)
    first = await window.append(draft("one", key="q1"), outbox, jobs=jobs)
    second = await window.append(draft("two", key="q2"), outbox, jobs=jobs)
    assert (first.job_first, second.job_first) == (True, False)
    for result in (first, second):
        assert result.job_id is not None
        await jobs.done(ReplyJob(result.job_id, result.message))
    third = await window.append(draft("three", key="q3"), outbox, jobs=jobs)
    assert third.job_first  # the line is empty again
    keys = ConversationKeys(window.prefix, CID)
    for key in keys.job_keys():  # a conversation's first job gives its keys their TTL
        assert await window.redis.ttl(key) > 0
    resent = await window.append(draft("three", key="q3"), outbox, jobs=jobs)
    assert resent.duplicate and not resent.job_first and resent.job_id is None
    await jobs.close()


# A gate that reads its keys from V: refuses with the first key's number and says whether
# the second (a hash) read as false.
# A follow that says what it was given (the offset, its first key's value, an arg) while the
# probe key is set, and declines (0) once it is gone.
_ECHO_FOLLOW = """
if not V[1] then return 0 end
redis.call('SET', K[2], A[1])
return {offset, V[1], A[1]}
"""


async def test_a_follow_runs_in_the_question_s_append_only_when_its_job_is_alone(
    redis_clients: RedisClients,
) -> None:
    """First in line, the follow runs in the question's own step; a table it returns stands
    for the question's job (none is added), anything else leaves the job to be added."""
    from storage.jobs.redis import RedisReplyJobs
    from storage.window.base import AppendFollow

    window, outbox = await make_pair(redis_clients, fanout_head=_no_head)
    jobs = RedisReplyJobs(window.redis, holder="w1", cluster=redis_clients.cluster)
    await jobs.start()
    keys = ConversationKeys(window.prefix, CID)
    probe = keys.base + ":probe"
    seen: list[str] = []

    def follow(question_id: str) -> AppendFollow:
        seen.append(question_id)
        return AppendFollow(_ECHO_FOLLOW, (probe, keys.base + ":out"), ("x",))

    await window.rebuild(CID, [], 0)
    if redis_clients.cluster:  # its keys may be in other slots: the caller does it after
        assert not window.follows
        with pytest.raises(TypeError):
            await window.append(draft("one", key="q1"), outbox, jobs=jobs, follow=follow)
        return
    await window.redis.set(probe, "seen")
    first = await window.append(draft("one", key="q1"), outbox, jobs=jobs, follow=follow)
    assert seen == [first.message.id]  # built from the new message's id
    assert first.followed == [first.message.offset, b"seen", b"x"]
    assert await window.redis.get(keys.base + ":out") == b"x"
    assert first.job_id is None  # what the follow did stands for the job
    assert await jobs.unfinished(CID) == []
    await window.redis.delete(probe)
    second = await window.append(draft("two", key="q2"), outbox, jobs=jobs, follow=follow)
    assert second.followed == 0 and second.job_first  # it ran and declined: a job as usual
    assert second.job_id == second.message.id
    third = await window.append(draft("three", key="q3"), outbox, jobs=jobs, follow=follow)
    assert third.job_id is not None and not third.job_first
    assert third.followed is None  # an older job is unfinished: no follow
    resent = await window.append(draft("one", key="q1"), outbox, jobs=jobs, follow=follow)
    assert resent.duplicate and resent.followed is None
    answer = MessageDraft(conversation_id=CID, role="assistant", text="a", client_msg_id="g")
    answered = await window.append(answer, outbox, jobs=jobs, answers=second.job_id, follow=follow)
    assert answered.followed is None
    assert len(seen) == 4  # built for each question's append (a resend's too), no answer's
