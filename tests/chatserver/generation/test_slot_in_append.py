"""A question first in line: its append takes the reply's slot and reads its context in the
same step (one Redis, the app's own client), so the reply starts with no round trip."""

from __future__ import annotations

from typing import Any

from chatserver import keys
from chatserver.generation.jobs import generation_id_for
from protocol import Role
from storage.jobs.base import ReplyJob
from storage.records import MessageDraft
from storage.redis_keys import ConversationKeys

from ..conftest import MakeHarness


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


async def test_a_question_first_in_line_starts_its_reply_without_taking_the_slot_again(
    make_harness: MakeHarness, redis_url: str
) -> None:
    harness = await make_harness(redis_url=redis_url, local_ttft_ms=200)
    begun = _count_begins(harness.app[keys.GENERATION])
    conv = await harness.conversation("alice")
    alice = await harness.connect("alice")
    await alice.join(conv)
    earlier = await alice.send(conv, "an earlier question, so the context holds more")
    assert (await alice.reply(earlier.message_id)).end is not None
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


async def test_a_slot_taken_for_a_reply_that_never_streams_is_released(
    make_harness: MakeHarness, redis_url: str
) -> None:
    """A question appended as the instance begins to stop: its job is kept for another
    instance, and the slot its append took is freed, so that one runs it in full."""
    harness = await make_harness(redis_url=redis_url)
    manager = harness.app[keys.GENERATION]
    conversations = harness.app[keys.CONVERSATIONS]
    conv_id = await harness.conversation("alice")
    conversation = await conversations.get(conv_id)
    assert conversation is not None
    draft = MessageDraft(conv_id, Role.USER.value, "asked while stopping", user_id="alice")
    result = await conversations.append(
        draft, follow=manager.append_follow(conversation, draft.text)
    )
    assert result.followed is not None and result.job_id is not None
    reply_key = ConversationKeys("chat", conv_id).reply
    redis = harness.app[keys.REDIS]
    assert await redis.hget(reply_key, "gid") == generation_id_for(result.message.id).encode()
    manager._closing = True  # what shutdown sets first
    job = ReplyJob(result.job_id, result.message, first=result.job_first)
    run = manager.start(conversation, result.message, job, result.followed)
    await manager.shutdown(2)
    assert not await redis.exists(reply_key)
    assert run.prepared is None
    assert job.job_id not in manager.held
