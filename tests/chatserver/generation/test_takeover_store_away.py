"""Taking over a stopped instance's work while the store is away: nothing is left held by
a live instance that will never run it (no other instance takes a live holder's work)."""

from __future__ import annotations

from typing import Any

from chatserver import keys
from chatserver.generation.jobs import claim_jobs, generation_id_for
from chatserver.generation.leases import sweep_orphans
from protocol import Message, Role
from storage.jobs.base import ReplyJob
from storage.records import MessageDraft
from storage.redis_keys import ConversationKeys
from storage.store.base import StoreUnavailable

from ..conftest import MakeHarness, eventually, stop_instance
from .test_slot_in_append import append_taking_the_slot


async def test_a_job_that_cannot_start_is_retried_and_the_next_ones_run(
    make_harness: MakeHarness,
) -> None:
    """Jobs this instance holds (taken over, or failed here before an end) start one after
    the other; the first one's conversation cannot be read (the store is away): the ones
    after it still start, and it starts at the next round. Before, the error ended the
    round: every job after it stayed held by a live instance, never run, never answered."""
    harness = await make_harness()
    manager = harness.app[keys.GENERATION]
    conversations = harness.app[keys.CONVERSATIONS]
    assert manager.jobs is not None
    questions: list[Message] = []
    job_ids: list[str] = []
    for n in range(3):
        conv = await harness.conversation("alice")
        draft = MessageDraft(conv, Role.USER.value, f"question {n}", user_id="alice")
        appended = await conversations.append(draft)  # its job with it, as a send's
        assert appended.job_id is not None
        questions.append(appended.message)
        job_ids.append(appended.job_id)
    manager.retry_jobs = [
        ReplyJob(job_id, question) for job_id, question in zip(job_ids, questions, strict=True)
    ]
    unreadable = questions[0].conversation_id
    read = conversations.get

    async def get_while_the_store_is_away(conversation_id: str) -> Any:
        if conversation_id == unreadable:
            raise StoreUnavailable("Postgres unavailable")
        return await read(conversation_id)

    conversations.get = get_while_the_store_is_away  # type: ignore[method-assign]
    try:
        assert await claim_jobs(manager, manager.jobs) == 2  # the two after it
    finally:
        conversations.get = read  # type: ignore[method-assign]
    assert [job.message.id for job in manager.retry_jobs] == [questions[0].id]

    async def answered(question: Message) -> bool:
        page = await conversations.history(question.conversation_id, None, 10)
        gid = generation_id_for(question.id)
        return any(m.client_msg_id == gid and m.text for m in page.messages)

    for question in questions[1:]:
        await eventually(lambda q=question: answered(q), what=f"{question.text} answered")
    assert not await answered(questions[0])
    assert await claim_jobs(manager, manager.jobs) == 1  # the next round: the store is back
    await eventually(lambda: answered(questions[0]), what="the first question answered")
    assert manager.retry_jobs == []


async def test_a_reply_to_run_again_whose_question_cannot_be_read_ends_with_why(
    make_harness: MakeHarness, redis_url: str
) -> None:
    """A question's append took the reply's slot (no job: the slot stands for it); its
    instance stops before the reply streams. The sweep that takes the slot over runs the
    reply again, but the store is away when it reads the conversation: the reply ends with
    an error that says so. Before, the error left the sweep with the slot, owned by a live
    instance that no sweep takes from: the question was never answered."""
    first = await make_harness(redis_url=redis_url, server_id="first")
    other = await make_harness(redis_url=redis_url, server_id="other")
    manager = first.app[keys.GENERATION]
    conversations = first.app[keys.CONVERSATIONS]
    conv_id, conversation, result = await append_taking_the_slot(first)
    manager._closing = True  # what shutdown sets first: the reply does not stream
    manager.start(conversation, result.message, None, result.followed)
    await manager.shutdown(2)
    later = MessageDraft(conv_id, Role.ASSISTANT.value, "a later message", client_msg_id="x")
    await conversations.append(later)  # the question is no longer the newest
    await stop_instance(first, other)
    survivor = other.app[keys.GENERATION]
    survivor_conversations = other.app[keys.CONVERSATIONS]
    read = survivor_conversations.get

    async def get_while_the_store_is_away(conversation_id: str) -> Any:
        raise StoreUnavailable("Postgres unavailable")

    survivor_conversations.get = get_while_the_store_is_away  # type: ignore[method-assign]
    try:
        await sweep_orphans(survivor._buffer, survivor.store_and_end, True, survivor.rerun)
    finally:
        survivor_conversations.get = read  # type: ignore[method-assign]
    view = await survivor_conversations.read_window(conv_id, limit=10)
    [answer] = [m for m in view.messages if m.reply_to == result.message.id]
    assert answer.finish_reason == "error"
    assert answer.client_msg_id == generation_id_for(result.message.id)
    assert not await other.app[keys.REDIS].exists(ConversationKeys("chat", conv_id).reply)
