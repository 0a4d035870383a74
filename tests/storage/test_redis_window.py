"""What only the Redis window has: the Lua append, key TTLs, flushes and the cluster path.

Every test runs on a single Redis and on a three-master Redis Cluster (``redis_clients``).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import pytest

from protocol import Usage
from storage import MemoryOutbox, MessageDraft, WindowMissing
from storage.jobs.redis import RedisReplyJobs
from storage.outbox.redis import RedisOutbox
from storage.redis_codec import decode_message
from storage.redis_keys import ConversationKeys
from storage.window.base import AppendGate, AppendRefused
from storage.window.redis import TTL_EVERY, RedisWindow

if TYPE_CHECKING:
    from conftest import MessageFactory, RedisClients

CID = "conv-r"


def draft(text: str = "hi", *, key: str | None = None, cid: str = CID) -> MessageDraft:
    return MessageDraft(
        conversation_id=cid, role="user", text=text, user_id="u1", client_msg_id=key
    )


def _no_head(conversation_id: str, published_at: float, payload: bytes) -> bytes:
    """A fan-out envelope's head (the app packs its own): what a question with a job needs."""
    return b""


async def make_pair(clients: RedisClients, **options: Any) -> tuple[RedisWindow, RedisOutbox]:
    """A started window and outbox on a client of their own (as another instance would be)."""
    redis = clients.new()
    window = RedisWindow(redis, cluster=clients.cluster, **options)
    outbox = RedisOutbox(redis, consumer="w1", shards=3 if clients.cluster else 1)
    await window.start()
    return window, outbox


async def test_concurrent_appends_from_two_clients_get_each_offset_once(
    redis_clients: RedisClients,
) -> None:
    w1, box1 = await make_pair(redis_clients, size=50)
    w2, box2 = await make_pair(redis_clients, size=50)
    await w1.rebuild(CID, [], 0)
    results = await asyncio.gather(
        *(
            (w1 if i % 2 else w2).append(draft(f"m{i}", key=f"k{i}"), box1 if i % 2 else box2)
            for i in range(200)
        )
    )
    assert sorted(r.message.offset for r in results) == list(range(1, 201))
    view = await w2.read(CID, limit=1000)
    assert view is not None
    by_offset = {r.message.offset: r.message for r in results}
    assert [m.offset for m in view.messages] == list(range(151, 201))
    assert list(view.messages) == [by_offset[o] for o in range(151, 201)]
    # Redis TIME orders them: creation times never decrease along the offsets.
    stamps = [by_offset[o].created_at for o in range(1, 201)]
    assert stamps == sorted(stamps)
    entries = await box1.read(1000, 1.0)
    assert sorted(e.message.offset for e in entries) == list(range(1, 201))
    assert {e.message.offset: e.message for e in entries} == by_offset


async def test_the_outbox_entry_holds_the_complete_message(redis_clients: RedisClients) -> None:
    window, outbox = await make_pair(redis_clients)
    await window.rebuild(CID, [], 0)
    d = MessageDraft(
        conversation_id=CID,
        role="assistant",
        text="answer ✓",
        agent_id="a1",
        client_msg_id="c-1",
        finish_reason="stop",
        usage=Usage(3, 7),
        model="echo",
        reply_to="m-0",
    )
    message = (await window.append(d, outbox)).message
    # Read the raw stream entry, as another instance's batch writer would.
    raw = await outbox.redis.xrange(outbox.key_for(CID))
    assert len(raw) == 1
    fields = raw[0][1]
    assert decode_message(fields[b"m"], int(fields[b"o"]), int(fields[b"t"])) == message
    assert [e.message for e in await outbox.read(10, 1.0)] == [message]


async def test_append_needs_a_redis_outbox(redis_clients: RedisClients) -> None:
    window, _ = await make_pair(redis_clients)
    await window.rebuild(CID, [], 0)
    with pytest.raises(TypeError):
        await window.append(draft(), MemoryOutbox())


class FlakyOutbox(RedisOutbox):
    """Dies (for the caller) between the window step and the outbox step, once."""

    fail_next_push = True

    async def push(self, shard: int, payload: bytes, offset: int, created_ms: int | None) -> None:
        if self.fail_next_push:
            self.fail_next_push = False
            raise ConnectionError("instance died before the outbox step")
        await super().push(shard, payload, offset, created_ms)


async def test_a_duplicate_re_enqueues_a_message_whose_outbox_step_died(
    redis_clients: RedisClients,
) -> None:
    redis = redis_clients.new()
    window = RedisWindow(redis, cluster=redis_clients.cluster)
    outbox = FlakyOutbox(redis, consumer="w1", shards=3 if redis_clients.cluster else 1)
    await outbox.start()
    await window.start()
    await window.rebuild(CID, [], 0)
    if not redis_clients.cluster:
        # One script does it all on a single Redis: there is no second step to die in.
        first = await window.append(draft("sent", key="k1"), outbox)
        assert outbox.fail_next_push and await outbox.backlog() == 1
        assert (await window.append(draft("sent", key="k1"), outbox)).message == first.message
        assert await outbox.backlog() == 1
        return
    with pytest.raises(ConnectionError):
        await window.append(draft("lost?", key="k1"), outbox)  # no ack reached the client
    assert await outbox.backlog() == 0
    view = await window.read(CID, limit=10)
    assert view is not None and [m.text for m in view.messages] == ["lost?"]
    # The client resends: the first message is returned and enqueued after all.
    again = await window.append(draft("lost?", key="k1"), outbox)
    assert again.duplicate and again.message == view.messages[0]
    assert [e.message for e in await outbox.read(10, 1.0)] == [again.message]
    # Now it is known to be queued: a further duplicate enqueues nothing.
    assert (await window.append(draft("lost?", key="k1"), outbox)).duplicate
    assert await outbox.backlog() == 1


async def test_keys_have_ttls_refreshed_on_append(redis_clients: RedisClients) -> None:
    window, outbox = await make_pair(redis_clients, key_ttl_s=1000, idempotency_ttl_s=60)
    await window.rebuild(CID, [], 0)
    await window.append(draft(key="k1"), outbox)
    keys = ConversationKeys("chat", CID)
    redis = window.redis
    ttls = [await redis.ttl(k) for k in (keys.epoch, keys.win, keys.seq)]
    assert 990 <= ttls[0] <= 1000 and 990 <= ttls[1] <= 1000
    assert 1990 <= ttls[2] <= 2000  # the counter outlives the window
    assert 59 <= await redis.ttl(keys.idem("u1", "k1")) <= 60
    for key in (keys.epoch, keys.win, keys.seq):
        await redis.expire(key, 5)
    # Refreshed every TTL_EVERY offsets, not on each append (the window is a cache).
    for _ in range(2, TTL_EVERY):
        await window.append(draft(), outbox)
    assert [await redis.ttl(k) <= 5 for k in (keys.epoch, keys.win, keys.seq)] == [True] * 3
    await window.append(draft(), outbox)  # offset TTL_EVERY
    assert [await redis.ttl(k) >= 990 for k in (keys.epoch, keys.win, keys.seq)] == [True] * 3
    # Every key of the conversation is in one cluster slot.
    names = [keys.epoch, keys.win, keys.seq, keys.idem("u1", "k1")]
    if redis_clients.cluster:
        assert len({redis.keyslot(n) for n in names}) == 1  # type: ignore[union-attr]


async def test_an_empty_rebuild_leaves_a_stream_with_its_ttl(redis_clients: RedisClients) -> None:
    # The appends refresh TTLs only every TTL_EVERY offsets: a stream created by an append
    # would have none and outlive its window.
    window, outbox = await make_pair(redis_clients, key_ttl_s=1000)
    await window.rebuild(CID, [], 0)
    keys = ConversationKeys("chat", CID)
    assert 990 <= await window.redis.ttl(keys.win) <= 1000
    first = await window.append(draft("one"), outbox)
    assert first.message.offset == 1
    assert 990 <= await window.redis.ttl(keys.win) <= 1000
    view = await window.read(CID, limit=10)
    assert view is not None and [m.text for m in view.messages] == ["one"]
    assert view.first_offset == 1 and view.last_offset == 1
    assert await window.recent(CID, 10) == view.messages


async def test_a_flushall_is_a_miss_and_rebuild_goes_on_from_the_store(
    redis_clients: RedisClients,
) -> None:
    window, outbox = await make_pair(redis_clients)
    await window.rebuild(CID, [], 0)
    sent = [(await window.append(draft(f"m{i}"), outbox)).message for i in range(5)]
    before = await window.read(CID, limit=10)
    assert before is not None
    for entry in await outbox.read(10, 1.0):
        assert entry.message in sent  # persisted by a writer, say; then Redis loses it all
    await window.redis.flushall()
    misses = window.misses
    assert await window.read(CID, limit=10) is None
    assert window.misses == misses + 1
    with pytest.raises(WindowMissing):
        await window.append(draft(), outbox)
    # The counter is gone too: the store's last offset is where offsets go on.
    await window.rebuild(CID, sent, 5)
    after = await window.read(CID, limit=10)
    assert after is not None and after.epoch != before.epoch
    assert list(after.messages) == sent and after.last_offset == 5
    sixth = (await window.append(draft("m5"), outbox)).message
    assert sixth.offset == 6
    # The outbox group went with the flush; reading recreates it and finds the new entry.
    assert [e.message for e in await outbox.read(10, 1.0)] == [sixth]


async def test_a_surviving_counter_beats_a_lagging_store(
    redis_clients: RedisClients, new_message: MessageFactory
) -> None:
    window, outbox = await make_pair(redis_clients)
    await window.rebuild(CID, [], 0)
    for i in range(7):
        await window.append(draft(f"m{i}"), outbox)
    keys = ConversationKeys("chat", CID)
    await window.redis.delete(keys.epoch)  # evicted; the window stream may linger
    await window.redis.delete(keys.win)
    stored = [new_message(CID) for _ in range(4)]  # the store has only 1..4 so far
    await window.rebuild(CID, stored, 4)
    view = await window.read(CID, limit=10)
    assert view is not None and view.last_offset == 7 and view.messages == ()
    assert (await window.append(draft(), outbox)).message.offset == 8


async def test_a_lost_counter_under_a_live_window_forces_a_rebuild(
    redis_clients: RedisClients,
) -> None:
    window, outbox = await make_pair(redis_clients)
    await window.rebuild(CID, [], 0)
    first = (await window.append(draft(), outbox)).message
    await window.redis.delete(ConversationKeys("chat", CID).seq)
    with pytest.raises(WindowMissing):  # rather than restart at offset 1
        await window.append(draft(), outbox)
    await window.rebuild(CID, [first], 1)
    assert (await window.append(draft(), outbox)).message.offset == 2


async def test_concurrent_rebuilds_agree_on_one_epoch(
    redis_clients: RedisClients, new_message: MessageFactory
) -> None:
    windows = [(await make_pair(redis_clients))[0] for _ in range(2)]
    stored = [new_message(CID) for _ in range(3)]
    await asyncio.gather(*(windows[i % 2].rebuild(CID, stored, 3) for i in range(10)))
    views = [await w.read(CID, limit=10) for w in windows]
    assert views[0] is not None and views[0] == views[1]
    assert list(views[0].messages) == stored


async def test_read_bounds_match_a_plain_filter(redis_clients: RedisClients) -> None:
    window, outbox = await make_pair(redis_clients, size=12)
    await window.rebuild(CID, [], 0)
    for i in range(30):
        await window.append(draft(f"m{i}"), outbox)
    held = list(range(19, 31))
    for after in range(0, 33, 2):
        for before in (None, *range(0, 33, 3)):
            for limit in (0, 1, 4, 40):
                view = await window.read(CID, after=after, before=before, limit=limit)
                assert view is not None and (view.first_offset, view.last_offset) == (19, 30)
                wanted = [o for o in held if o > after and (before is None or o < before)]
                got = [m.offset for m in view.messages]
                assert got == (wanted[-limit:] if limit else []), (after, before, limit)


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
_READING_GATE = """
local value = V[1] and tonumber(V[1]) or -1
return {value, V[2] == false and 1 or 0}
"""


async def test_a_gate_s_keys_are_read_by_the_append_s_own_mget(
    redis_clients: RedisClients,
) -> None:
    window, outbox = await make_pair(redis_clients)
    gate = AppendGate(_READING_GATE, ("gate-number", "gate-hash"), ())
    if redis_clients.cluster:  # no gates there: the caller checks first, on its own
        with pytest.raises(TypeError):
            await window.append(draft("one"), outbox, gate)
        return
    await window.rebuild(CID, [], 0)
    await window.redis.set("gate-number", "41")
    await window.redis.hset("gate-hash", "f", "v")
    before = await window.redis.info("commandstats")
    with pytest.raises(AppendRefused) as refused:
        await window.append(draft("one"), outbox, gate)
    after = await window.redis.info("commandstats")
    assert (refused.value.code, refused.value.value) == (41, 1)
    mgets = after["cmdstat_mget"]["calls"] - before.get("cmdstat_mget", {}).get("calls", 0)
    assert mgets == 1  # the gate read nothing on its own


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
