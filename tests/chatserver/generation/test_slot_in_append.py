"""A question first in line: its append takes the reply's slot and reads its context in the
same step (one Redis, the app's own client), so the reply starts with no round trip."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from typing import Any

from redis.asyncio import Redis

from chatserver import keys
from chatserver.generation.jobs import generation_id_for
from chatserver.generation.leases import sweep_orphans
from protocol import Message, Role, format_timestamp
from storage.jobs.redis import RedisReplyJobs
from storage.records import AppendResult, Conversation, MessageDraft
from storage.redis_keys import ConversationKeys

from ..conftest import Harness, MakeHarness, eventually, stop_instance


def _count_begins(manager: Any) -> list[str]:
    """The generation ids the buffer's ``begin`` (the slot's own round trip) was called for."""
    buffer = manager._buffer
    begun: list[str] = []
    begin = buffer.begin

    async def counted(owner: Any) -> Any:
        begun.append(owner.generation_id)
        return await begin(owner)

    buffer.begin = counted
    return begun


async def append_taking_the_slot(harness: Harness) -> tuple[str, Conversation, AppendResult]:
    """A question whose append took its reply's slot: no job, the slot stands for it."""
    manager = harness.app[keys.GENERATION]
    conversations = harness.app[keys.CONVERSATIONS]
    conv_id = await harness.conversation("alice")
    conversation = await conversations.get(conv_id)
    assert conversation is not None
    draft = MessageDraft(conv_id, Role.USER.value, "asked while stopping", user_id="alice")
    result = await conversations.append(
        draft, follow=manager.append_follow(conversation, draft.text)
    )
    assert result.followed is not None and result.job_id is None  # no job: the slot is it
    return conv_id, conversation, result


async def test_a_question_first_in_line_starts_its_reply_without_taking_the_slot_again(
    make_harness: MakeHarness, redis_url: str
) -> None:
    harness = await make_harness(redis_url=redis_url, local_ttft_ms=200)
    begun = _count_begins(harness.app[keys.GENERATION])
    conversations = harness.app[keys.CONVERSATIONS]
    append = conversations.append
    followed: list[Any] = []

    async def recorded(*args: Any, **kwargs: Any) -> Any:
        result = await append(*args, **kwargs)
        if isinstance(result.followed, list):  # it took the slot (0: held already)
            followed.append(result.followed)
        return result

    conversations.append = recorded  # type: ignore[method-assign]
    conv = await harness.conversation("alice")
    alice = await harness.connect("alice")
    await alice.join(conv)
    earlier = await alice.send(conv, "an earlier question, so the context holds more")
    assert (await alice.reply(earlier.message_id)).end is not None
    earlier_offset = earlier.offset
    first = await alice.send(conv, "first in line")
    second = await alice.send(conv, "behind the first")  # its job is not alone: asks as usual
    replies = [await alice.reply(first.message_id), await alice.reply(second.message_id)]
    for reply in replies:
        assert reply.end is not None and reply.end.message is not None
        assert reply.end.finish_reason == "stop"
    # Each answers its own question (the local model echoes the context's last message).
    assert replies[0].text.startswith("You said: first in line")
    assert replies[1].text.startswith("You said: behind the first")
    assert generation_id_for(first.message_id) not in begun
    assert generation_id_for(second.message_id) in begun
    # The earlier question's follow read its context whole; the first one's only itself:
    # the earlier context was kept decoded, and the earlier answer, appended here, with it.
    (_, whole, epoch, after), (_, since, same_epoch, later_after) = followed
    assert after == 0 and len(whole) == 1
    assert same_epoch == epoch and later_after == earlier_offset + 1 == first.offset - 1
    assert [int(e[0].split(b"-")[0]) for e in since] == [first.offset]


async def test_a_slot_its_append_took_is_the_question_s_job_until_answered(
    make_harness: MakeHarness, redis_url: str
) -> None:
    """The append adds no job for a question whose slot it took: the slot stands for it. The
    instance stops before the reply streams; it keeps the slot, and once it is gone another
    instance's sweep runs the reply in full."""
    first = await make_harness(redis_url=redis_url, server_id="first")
    other = await make_harness(redis_url=redis_url, server_id="other")
    manager = first.app[keys.GENERATION]
    conversations = first.app[keys.CONVERSATIONS]
    conv_id, conversation, result = await append_taking_the_slot(first)
    assert not await first.app[keys.REDIS].exists(ConversationKeys("chat", conv_id).jobs)
    reply_key = ConversationKeys("chat", conv_id).reply
    redis = first.app[keys.REDIS]
    gid = generation_id_for(result.message.id)
    assert await redis.hget(reply_key, "gid") == gid.encode()
    manager._closing = True  # what shutdown sets first
    manager.start(conversation, result.message, None, result.followed)
    await manager.shutdown(2)
    assert (
        await redis.hget(reply_key, "owner") == first.app[keys.SETTINGS].server.server_id.encode()
    )
    later = MessageDraft(conv_id, Role.ASSISTANT.value, "a later message", client_msg_id="x")
    await conversations.append(later)  # the question is no longer the newest
    await stop_instance(first, other)
    conversations = other.app[keys.CONVERSATIONS]
    survivor = other.app[keys.GENERATION]
    await sweep_orphans(survivor._buffer, survivor.store_and_end, True, survivor.rerun)

    async def answered() -> bool:
        view = await conversations.read_window(conv_id, limit=10)
        return any(m.reply_to == result.message.id for m in view.messages)

    await eventually(answered)
    view = await conversations.read_window(conv_id, limit=10)
    [answer] = [m for m in view.messages if m.reply_to == result.message.id]
    assert answer.finish_reason == "stop" and "asked while stopping" in answer.text


async def test_a_queue_of_questions_asks_redis_for_its_turn_once_not_per_question(
    make_harness: MakeHarness, redis_url: str
) -> None:
    """The first question's slot stands for its job, so the second one's job is first in
    line and waits in the lane; the third asks whether it may go, and every question behind
    it waits on the instance without asking (the oldest waiting asks for all). Each is
    still answered, in order."""
    harness = await make_harness(redis_url=redis_url, local_ttft_ms=300)
    manager = harness.app[keys.GENERATION]
    assert manager.jobs is not None
    asked: list[str] = []
    turn = manager.jobs.turn

    async def counted(job: Any) -> Any:
        asked.append(job.job_id)
        return await turn(job)

    manager.jobs.turn = counted
    conv = await harness.conversation("alice")
    alice = await harness.connect("alice")
    await alice.join(conv)
    sent = [await alice.send(conv, f"question {i}") for i in range(6)]
    await eventually(lambda: len(manager._waiting_turn.get(conv, ())) == 4)
    assert asked == [sent[2].message_id]  # before: one per question waiting, 4
    for i, question in enumerate(sent):
        reply = await alice.reply(question.message_id)
        assert reply.end is not None and reply.text.startswith(f"You said: question {i}")


async def test_questions_behind_a_job_stuck_elsewhere_run_once_their_turn_wait_is_over(
    make_harness: MakeHarness, redis_url: str
) -> None:
    """An older question's job held by another instance that lives on but never answers:
    past ``CHAT_REPLY_TURN_WAIT_S`` the oldest question waiting (which polls) and the ones
    asleep behind it (one timer each) run anyway, in order."""
    harness = await make_harness(redis_url=redis_url, local_ttft_ms=5, reply_turn_wait_s=1.0)
    conv = await harness.conversation("alice")
    stuck = RedisReplyJobs(Redis.from_url(redis_url), holder="stuck-elsewhere", lease_s=60)
    try:
        await stuck.start()  # alive for a minute: nobody claims its job
        created = format_timestamp(datetime.now(UTC))
        await stuck.add(Message(str(uuid.uuid4()), conv, 0, "user", "stuck", created, "alice"))
        alice = await harness.connect("alice")
        await alice.join(conv)
        loop = asyncio.get_running_loop()
        began = loop.time()
        sent = [await alice.send(conv, f"question {i}") for i in range(3)]
        for i, question in enumerate(sent):
            reply = await alice.reply(question.message_id, timeout=10)
            assert reply.end is not None and reply.text.startswith(f"You said: question {i}")
        assert loop.time() - began >= 1.0  # they did wait for the stuck one first
    finally:
        await stuck.redis.aclose()


async def test_questions_queued_behind_one_waiting_here_get_no_task_until_their_turn(
    make_harness: MakeHarness, redis_url: str
) -> None:
    """A long queue costs a heap entry a question, not a reply run, a task and a timer: the
    questions behind the oldest one waiting on the instance are parked, made when their turn
    is near, and each is still answered, in order. Only the first question's append carries
    the follow that takes the slot: behind it, the slot is held and no job is alone."""
    harness = await make_harness(redis_url=redis_url, local_ttft_ms=300)
    manager = harness.app[keys.GENERATION]
    followed: list[str] = []
    slot_follow = manager._buffer.slot_follow

    def counted(owner: Any, *args: Any) -> Any:
        followed.append(owner.reply_to)
        return slot_follow(owner, *args)

    manager._buffer.slot_follow = counted
    conv = await harness.conversation("alice")
    alice = await harness.connect("alice")
    await alice.join(conv)
    sent = [await alice.send(conv, "question 0")]
    await eventually(lambda: conv in manager._live_in)  # its reply holds the slot
    sent += [await alice.send(conv, f"question {i}") for i in range(1, 12)]
    await eventually(lambda: len(manager._waiting_turn.get(conv, ())) == 10)
    # The reply streaming, the next one first in line in the lane, the oldest waiting.
    assert len(manager._tasks) == 3
    assert followed == [sent[0].message_id]
    for i, question in enumerate(sent):
        reply = await alice.reply(question.message_id)
        assert reply.end is not None and reply.text.startswith(f"You said: question {i}")
    assert not manager._tasks and not manager._waiting_turn
