"""Replies and jobs taken over from a stopped instance: a reply run again goes ahead of the
replies queued behind it on the instance that takes it over; one the same server id streamed
before it was started again is cut off, not run twice; an instance stopping claims none."""

from __future__ import annotations

from chatserver import keys
from chatserver.generation.buffer import ReplyOwner
from chatserver.generation.jobs import claim_jobs, generation_id_for
from chatserver.generation.leases import sweep_orphans
from chatserver.generation.redis_buffer import RedisReplyBuffer
from protocol import Message, Role
from storage.jobs.base import ReplyJob
from storage.records import MessageDraft
from storage.redis_keys import ConversationKeys

from ..conftest import MakeHarness, eventually, stop_instance
from .test_slot_in_append import append_taking_the_slot


async def test_a_reply_run_again_does_not_queue_behind_one_waiting_for_its_slot(
    make_harness: MakeHarness, redis_url: str
) -> None:
    """The first question's append took the reply's slot (it stands for its job); its
    instance stops before the reply streams. A second question, on the other instance,
    waits there for that slot, in the conversation's lane. The other instance's sweep takes
    the slot over and runs the first reply again: it goes at once, and the second after it.
    Before, the reply run again queued in the lane behind the second, which waited for the
    slot the first held: both stood still until the slot's time to live ran out (a minute),
    and an instance stopped meanwhile left the first question with neither slot nor job:
    never answered."""
    first = await make_harness(redis_url=redis_url, server_id="first")
    other = await make_harness(redis_url=redis_url, server_id="other")
    stopping = first.app[keys.GENERATION]
    conv_id, conversation, asked = await append_taking_the_slot(first)
    stopping._closing = True  # what shutdown sets first: the reply does not stream
    stopping.start(conversation, asked.message, None, asked.followed)
    await stopping.shutdown(2)
    survivor = other.app[keys.GENERATION]
    conversations = other.app[keys.CONVERSATIONS]
    draft = MessageDraft(conv_id, Role.USER.value, "asked on the other", user_id="alice")
    second = await conversations.append(draft)  # its job with it, as a send's
    assert second.job_id is not None
    job = ReplyJob(second.job_id, second.message, first=second.job_first)
    survivor.start(conversation, second.message, job)
    redis = other.app[keys.REDIS]
    waiting = generation_id_for(second.message.id).encode()
    reply_keys = ConversationKeys("chat", conv_id)

    async def second_waits() -> bool:
        return await redis.get(reply_keys.reply_next) == waiting  # next, once the slot is free

    await eventually(second_waits, what="the second reply waiting for the slot")
    await stop_instance(first, other)
    await sweep_orphans(survivor._buffer, survivor.store_and_end, True, survivor.rerun)

    async def answers() -> list[Message]:
        view = await conversations.read_window(conv_id, limit=10)
        return [m for m in view.messages if m.role == Role.ASSISTANT.value]

    async def both_answered() -> bool:
        return len(await answers()) == 2

    await eventually(both_answered, timeout=10, what="both questions answered")
    assert [m.reply_to for m in await answers()] == [asked.message.id, second.message.id]
    assert all(m.finish_reason == "stop" for m in await answers())


async def test_a_reply_of_an_earlier_run_under_the_same_id_is_cut_off_not_run_twice(
    make_harness: MakeHarness, redis_url: str
) -> None:
    """An instance started again under its server id takes back its earlier run's job,
    whose reply had streamed some text before the death: that reply is ended with its
    partial text, as any dead owner's, not streamed a second time. Before, the reply's
    owner (the same server id) was taken for this process: the job ran again, its new text
    appended to the old one in the buffer."""
    harness = await make_harness(redis_url=redis_url, server_id="fixed")
    manager = harness.app[keys.GENERATION]
    conversations = harness.app[keys.CONVERSATIONS]
    assert manager.jobs is not None
    conv_id = await harness.conversation("alice")
    draft = MessageDraft(conv_id, Role.USER.value, "asked before the restart", user_id="alice")
    asked = await conversations.append(draft)
    assert asked.job_id is not None
    question = asked.message
    earlier = RedisReplyBuffer(harness.app[keys.REDIS], server_id="fixed")  # another process
    gid = generation_id_for(question.id)
    owner = ReplyOwner(conv_id, gid, "fixed", "general", "gemini-2.5-flash", question.id)
    assert await earlier.begin(owner)
    await earlier.append(conv_id, gid, 1, "cut here")  # seen by its members, then it died
    await manager._buffer.heartbeat()  # alive as this process (the earlier one set its key)
    manager.retry_jobs = [ReplyJob(asked.job_id, question, claimed=True)]
    assert await claim_jobs(manager, manager.jobs) == 1

    async def answer() -> Message | None:
        view = await conversations.read_window(conv_id, limit=10)
        return next((m for m in view.messages if m.reply_to == question.id), None)

    async def answered() -> bool:
        return await answer() is not None

    await eventually(answered, what="the question answered")
    ended = await answer()
    assert ended is not None
    assert (ended.text, ended.finish_reason) == ("cut here", "error")


async def test_an_instance_that_stops_claims_no_jobs(
    make_harness: MakeHarness, redis_url: str
) -> None:
    """A stopped instance's jobs wait for an instance that runs them: one that is stopping
    itself would only keep them (its replies do not start) until it too was swept."""
    dead = await make_harness(redis_url=redis_url, server_id="dead")
    other = await make_harness(redis_url=redis_url, server_id="other")
    conversations = dead.app[keys.CONVERSATIONS]
    conv_id = await dead.conversation("alice")
    draft = MessageDraft(conv_id, Role.USER.value, "asked of the dead", user_id="alice")
    assert (await conversations.append(draft)).job_id is not None  # held by "dead"
    await stop_instance(dead, other)
    stopping = other.app[keys.GENERATION]
    assert stopping.jobs is not None
    stopping._closing = True  # what shutdown sets first
    assert await claim_jobs(stopping, stopping.jobs) == 0
    stopping._closing = False
    assert await claim_jobs(stopping, stopping.jobs) == 1  # still there for a live one
