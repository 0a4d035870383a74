"""A question's model call begun beside its append (chatserver/generation/early.py): the
reply takes it when it asked what the reply would ask, and it is cancelled otherwise (another
prompt by then, a refused send, a resend). The app's own Redis, the local model or the fake
Gemini driven through the real clients."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from chatclient.client import ChatClient, ChatError
from chatserver import keys
from chatserver.generation import early as early_module
from chatserver.generation.provider import ReplyRequest
from protocol import Role
from storage.records import MessageDraft
from tests.fakegemini import FakeGemini, Stream

from ..conftest import Harness, MakeHarness, eventually


def _calls(harness: Harness, outcome: str) -> float:
    value = harness.app[keys.METRICS].registry.get_sample_value(
        "chat_early_model_calls_total", {"outcome": outcome}
    )
    return value or 0.0


def _record_opens(harness: Harness, events: list[tuple[str, str]]) -> list[ReplyRequest]:
    """The local model's requests, each also noted in ``events`` as ("opened", question)."""
    provider: Any = harness.app[keys.GENERATION].provider
    opened: list[ReplyRequest] = []
    open_ = provider.open

    def recorded(request: ReplyRequest, sink: Any) -> Any:
        events.append(("opened", request.history[-1].text))
        opened.append(request)
        return open_(request, sink)

    provider.open = recorded
    return opened


def _record_appends(harness: Harness, events: list[tuple[str, str]]) -> None:
    """Each user message's append, noted in ``events`` as ("appended", text) once done."""
    conversations: Any = harness.app[keys.CONVERSATIONS]
    append = conversations.append

    async def recorded(draft: MessageDraft, *args: Any, **kwargs: Any) -> Any:
        result = await append(draft, *args, **kwargs)
        if draft.role == Role.USER.value:
            events.append(("appended", draft.text))
        return result

    conversations.append = recorded


async def _asked(client: ChatClient, conv: str, text: str, **kw: Any) -> str:
    """Send ``text`` and wait for its whole reply; the reply's text."""
    ack = await client.send(conv, text, **kw)
    reply = await client.reply(ack.message_id)
    assert reply.end is not None and reply.end.finish_reason == "stop"
    return reply.text


async def test_the_model_call_begins_before_the_append_returns_and_the_reply_takes_it(
    make_harness: MakeHarness, redis_url: str
) -> None:
    harness = await make_harness(redis_url=redis_url, local_ttft_ms=50)
    events: list[tuple[str, str]] = []
    opened = _record_opens(harness, events)
    _record_appends(harness, events)
    conv = await harness.conversation("alice")
    alice = await harness.connect("alice")
    await alice.join(conv)
    first = await _asked(alice, conv, "the first question")
    # Nothing was held for the conversation yet: the first reply called the model after.
    assert events == [("appended", "the first question"), ("opened", "the first question")]
    assert _calls(harness, "adopted") == 0
    events.clear()
    assert (await _asked(alice, conv, "the second question")).startswith(
        "You said: the second question"
    )
    # The context was held (the first question, and its answer appended here): the call
    # began before the append was done, and the reply streamed from that one call.
    assert events == [("opened", "the second question"), ("appended", "the second question")]
    assert [(m.role, m.text) for m in opened[-1].history] == [
        ("user", "the first question"),
        ("assistant", first),
        ("user", "the second question"),
    ]
    assert _calls(harness, "adopted") == 1 and _calls(harness, "cancelled") == 0
    assert harness.app[keys.GENERATION].provider.active == 0


async def test_a_call_that_asked_another_prompt_is_cancelled_and_the_reply_asks_again(
    make_harness: MakeHarness, redis_url: str
) -> None:
    harness = await make_harness(redis_url=redis_url, local_ttft_ms=50, server_id="here")
    other = await make_harness(redis_url=redis_url, server_id="elsewhere")
    events: list[tuple[str, str]] = []
    opened = _record_opens(harness, events)
    conv = await harness.conversation("alice")
    alice = await harness.connect("alice")
    await alice.join(conv)
    await _asked(alice, conv, "the first question")
    # Written by another instance: what this one holds of the conversation lacks it.
    note = MessageDraft(conv, Role.ASSISTANT.value, "a note from elsewhere", client_msg_id="n1")
    await other.app[keys.CONVERSATIONS].append(note)
    opened.clear()
    text = await _asked(alice, conv, "the second question")
    assert text.startswith("You said: the second question")
    early, asked = opened  # the early call, then the reply's own, with the note in it
    assert "a note from elsewhere" not in [m.text for m in early.history]
    assert [m.text for m in asked.history][-2:] == ["a note from elsewhere", "the second question"]
    assert _calls(harness, "adopted") == 0 and _calls(harness, "cancelled") == 1
    assert harness.app[keys.GENERATION].provider.active == 0  # the early stream stopped
    history = await alice.history(conv)
    answers = [m for m in history.messages if m.role == Role.ASSISTANT.value]
    assert [m.text for m in answers][-1] == text  # one answer, from the second call


async def test_a_refused_send_cancels_its_call_and_its_user_gets_none_for_a_while(
    make_harness: MakeHarness, redis_url: str
) -> None:
    limits = "messages_per_minute=2,connections=100,daily_tokens=1000000000"
    harness = await make_harness(redis_url=redis_url, limits_free=limits)
    conv = await harness.conversation("alice", members=["bob"])
    alice = await harness.connect("alice")
    await alice.join(conv)
    await _asked(alice, conv, "one")
    await _asked(alice, conv, "two")
    assert _calls(harness, "adopted") == 1
    with pytest.raises(ChatError) as refused:
        await alice.send(conv, "three")
    assert refused.value.code == "rate_limited"
    assert _calls(harness, "cancelled") == 1
    generation = harness.app[keys.GENERATION]
    conversation = await harness.app[keys.CONVERSATIONS].get(conv)
    assert conversation is not None
    assert generation.begin_early(conversation, "four", "alice") is None
    other_user = generation.begin_early(conversation, "four", "bob")
    assert other_user is not None
    other_user.cancel()
    await eventually(lambda: generation.provider.active == 0)


async def test_early_calls_are_bounded_and_one_not_taken_cancels_itself(
    make_harness: MakeHarness, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(early_module, "ADOPT_WITHIN_S", 0.2)
    harness = await make_harness(redis_url=redis_url, max_replies_per_instance=2)
    conv = await harness.conversation("alice")
    alice = await harness.connect("alice")
    await alice.join(conv)
    await _asked(alice, conv, "one")  # the context is held now
    generation = harness.app[keys.GENERATION]
    conversation = await harness.app[keys.CONVERSATIONS].get(conv)
    assert conversation is not None
    calls = [generation.begin_early(conversation, "q", "alice") for _ in range(3)]
    assert calls[0] is not None and calls[1] is not None
    assert calls[2] is None  # no more open at once than questions the instance may hold
    # Taken by no run: each cancels itself, and its stream stops.
    await eventually(lambda: _calls(harness, "cancelled") == 2)
    assert all(call is not None and call.over for call in calls[:2])
    assert generation.provider.active == 0
    again = generation.begin_early(conversation, "q", "alice")  # room again
    assert again is not None
    again.cancel()


async def test_a_question_parked_behind_a_waiting_one_cancels_its_call_at_once(
    make_harness: MakeHarness, redis_url: str
) -> None:
    """Four questions at once, each with its call begun before any append is done, their
    appends let through one by one: bob's takes the reply's slot (and its call), alice's
    is next in line (it waits in the conversation's lane), carol's waits for its turn, and
    dave's is parked behind carol's with no task: dave's call is cancelled there and then,
    not when its turn comes nor after the ``ADOPT_WITHIN_S`` in which an unadopted call
    cancels itself."""
    harness = await make_harness(redis_url=redis_url, local_token_ms=120)  # 15 words: 1.8 s
    events: list[tuple[str, str]] = []
    _record_opens(harness, events)
    users = ("bob", "alice", "carol", "dave")  # the order their appends are let through
    conv = await harness.conversation("alice", members=["bob", "carol", "dave"])
    clients = {user: await harness.connect(user) for user in users}
    for client in clients.values():
        await client.join(conv)
    await _asked(clients["alice"], conv, "the first question")  # the context is held now
    conversations: Any = harness.app[keys.CONVERSATIONS]
    append = conversations.append
    gates = {f"q-{user}": asyncio.Event() for user in users}
    appended = {text: asyncio.Event() for text in gates}

    async def held(draft: MessageDraft, *args: Any, **kwargs: Any) -> Any:
        gate = gates.get(draft.text)
        if gate is not None:
            await gate.wait()
        result = await append(draft, *args, **kwargs)
        if gate is not None:
            appended[draft.text].set()
        return result

    conversations.append = held
    generation = harness.app[keys.GENERATION]
    acks = {}
    for user in users:
        acks[user] = asyncio.create_task(clients[user].send(conv, f"q-{user}"))
        await eventually(lambda text=f"q-{user}": ("opened", text) in events)
    for user in ("bob", "alice", "carol"):
        gates[f"q-{user}"].set()
        await asyncio.wait_for(appended[f"q-{user}"].wait(), 5)
    bob = asyncio.create_task(clients["bob"].reply((await acks["bob"]).message_id))
    await eventually(lambda: conv in generation._waiting_turn, what="carol's turn awaited")
    assert _calls(harness, "cancelled") == 0 and _calls(harness, "adopted") == 1  # bob's
    gates["q-dave"].set()
    await eventually(lambda: _calls(harness, "cancelled") == 1, what="dave's call cancelled")
    assert not bob.done()  # dave's call went when he was parked, bob's reply still running
    replies = {"bob": await bob}
    for user in users[1:]:
        replies[user] = await clients[user].reply((await acks[user]).message_id)
    for user, reply in replies.items():
        assert reply.end is not None and reply.text.startswith(f"You said: q-{user}")
    # alice's and carol's calls asked without the answers before theirs: each cancelled
    # when its reply's turn came, and the reply asked again.
    assert _calls(harness, "cancelled") == 3 and _calls(harness, "adopted") == 1
    assert generation.provider.active == 0


async def test_a_resend_cancels_its_call_and_gets_no_second_reply(
    make_harness: MakeHarness, redis_url: str
) -> None:
    harness = await make_harness(redis_url=redis_url)
    conv = await harness.conversation("alice")
    alice = await harness.connect("alice")
    await alice.join(conv)
    await _asked(alice, conv, "one")
    first = await alice.send(conv, "two", client_msg_id="two")
    await alice.reply(first.message_id)
    again = await alice.send(conv, "two", client_msg_id="two")  # its ack was lost, say
    assert again.duplicate and again.message_id == first.message_id
    assert _calls(harness, "cancelled") == 1
    third = await alice.send(conv, "three")  # the next reply is the third's: none came between
    reply = await alice.reply(third.message_id)
    assert reply.end is not None and reply.text.startswith("You said: three")
    history = await alice.history(conv)
    assert [m.reply_to for m in history.messages if m.role == Role.ASSISTANT.value].count(
        first.message_id
    ) == 1


async def _on_gemini(
    make_harness: MakeHarness, redis_url: str, fake: FakeGemini, transport: str
) -> Harness:
    return await make_harness(
        redis_url=redis_url,
        server_id="here",
        gemini_api_key="test-key",
        gemini_base_url=fake.base_url,
        gemini_transport=transport,
        gemini_timeout_s=5.0,
        gemini_retry_initial_s=0.02,
    )


async def test_a_gemini_call_is_taken_whole_or_closed(
    make_harness: MakeHarness, redis_url: str, fake: FakeGemini
) -> None:
    """A pull provider: the early call asks for the first item only; the reply reads the
    rest from the same request. A call not taken is closed: Gemini sees it go."""
    harness = await _on_gemini(make_harness, redis_url, fake, "sse")
    other = await make_harness(redis_url=redis_url, server_id="elsewhere")
    conv = await harness.conversation("alice")
    alice = await harness.connect("alice")
    await alice.join(conv)
    fake.script(Stream(["an answer"]))
    await _asked(alice, conv, "first question")
    fake.script(Stream(["taken ", "whole"], pace_s=0.05))
    assert await _asked(alice, conv, "second question") == "taken whole"
    assert len(fake.requests) == 2  # one request for the second question: the early one
    contents = fake.requests[1].body["contents"]
    assert [c["parts"][0]["text"] for c in contents] == [
        "first question",
        "an answer",
        "second question",
    ]
    assert _calls(harness, "adopted") == 1
    note = MessageDraft(conv, Role.ASSISTANT.value, "a note from elsewhere", client_msg_id="n1")
    await other.app[keys.CONVERSATIONS].append(note)
    fake.script(Stream(["never ", "shown"], pace_s=0.5), Stream(["the ", "answer"]))
    conversations: Any = harness.app[keys.CONVERSATIONS]
    append = conversations.append

    async def after_the_early_request(draft: MessageDraft, *args: Any, **kwargs: Any) -> Any:
        if draft.text == "third question":  # the early call has reached Gemini by now
            await fake.wait_requests(3)
        return await append(draft, *args, **kwargs)

    conversations.append = after_the_early_request
    assert await _asked(alice, conv, "third question") == "the answer"
    await fake.wait_disconnect(2)  # the early call, with the old context, was closed
    assert "a note from elsewhere" not in str(fake.requests[2].body["contents"])
    assert "a note from elsewhere" in str(fake.requests[3].body["contents"])
    assert _calls(harness, "cancelled") == 1


async def test_the_sdk_transport_makes_no_early_calls(
    make_harness: MakeHarness, redis_url: str, fake: FakeGemini
) -> None:
    """The SDK's stream, closed between chunks, leaves its response open: a call that was
    not taken could not be stopped, so none is begun there."""
    harness = await _on_gemini(make_harness, redis_url, fake, "sdk")
    conv = await harness.conversation("alice")
    alice = await harness.connect("alice")
    await alice.join(conv)
    for text in ("first question", "second question"):
        assert await _asked(alice, conv, text) == "Hello, world!"
    assert len(fake.requests) == 2
    assert _calls(harness, "adopted") == _calls(harness, "cancelled") == 0
