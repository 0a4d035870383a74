"""Conversations over the socket: fan-out, idempotency, typing, leave, history."""

from __future__ import annotations

import asyncio

import pytest

from chatclient.client import ChatClient
from protocol import Encoding, ErrorCode, ErrorFrame, MessageEvent, TypingNotice

from .conftest import Harness


async def test_a_message_reaches_every_member_in_either_encoding(harness: Harness) -> None:
    conv = await harness.conversation("alice", members=["bob", "carol"])
    alice = await harness.connect("alice", Encoding.JSON)
    bob = await harness.connect("bob", Encoding.MSGPACK)
    carol = await harness.connect("carol", Encoding.JSON)
    for client in (alice, bob, carol):
        await client.join(conv)
    ack = await alice.send(conv, "hello all", client_msg_id="c-1")
    seen = [await c.expect(MessageEvent) for c in (alice, bob, carol)]
    assert {m.message.id for m in seen} == {ack.message_id}
    assert all(m.message.text == "hello all" and m.message.user_id == "alice" for m in seen)
    assert all(m.message.offset == ack.offset == 1 for m in seen)
    replies = [await c.reply(ack.message_id) for c in (alice, bob, carol)]
    assert len({r.text for r in replies}) == 1
    assert [d.seq for d in replies[1].deltas] == list(range(1, len(replies[1].deltas) + 1))


async def test_repeated_client_msg_id_returns_the_first_ack(harness: Harness) -> None:
    conv = await harness.conversation("alice", members=["bob"])
    alice = await harness.connect("alice")
    bob = await harness.connect("bob")
    await bob.join(conv)
    first = await alice.send(conv, "once", client_msg_id="same-id")
    again = await alice.send(conv, "once", client_msg_id="same-id")
    assert not first.duplicate and again.duplicate
    assert (again.message_id, again.offset, again.created_at) == (
        first.message_id,
        first.offset,
        first.created_at,
    )
    await bob.expect(MessageEvent)
    await bob.reply(first.message_id)
    page = await alice.history(conv)
    user_messages = [m for m in page.messages if m.role == "user"]
    assert [m.client_msg_id for m in user_messages] == ["same-id"]
    # Only one reply was started: the duplicate produced no second message frame or reply.
    third = await alice.send(conv, "next", client_msg_id="other-id")
    assert third.offset == first.offset + 2  # the user message, its one reply, this one
    nxt = await bob.expect(MessageEvent)
    assert nxt.message.id == third.message_id


async def test_typing_reaches_the_others_only(harness: Harness) -> None:
    conv = await harness.conversation("alice", members=["bob"])
    alice = await harness.connect("alice")
    bob = await harness.connect("bob")
    await alice.join(conv)
    await bob.join(conv)
    await alice.typing(conv)
    notice = await bob.expect(TypingNotice)
    assert (notice.conversation_id, notice.user_id) == (conv, "alice")
    await alice.ping("marker")  # anything alice was sent before the pong is now buffered
    assert not any(isinstance(f, TypingNotice) for f in alice.pending())


async def test_leave_stops_delivery(harness: Harness) -> None:
    conv = await harness.conversation("alice", members=["bob"])
    alice = await harness.connect("alice")
    bob = await harness.connect("bob")
    await alice.join(conv)
    await bob.join(conv)
    left = await bob.leave(conv)
    assert left.conversation_id == conv
    ack = await alice.send(conv, "bob is gone")
    await alice.reply(ack.message_id)
    await bob.ping("marker")
    assert not any(isinstance(f, MessageEvent) for f in bob.pending())


async def test_history_pages_go_back_with_before(harness: Harness) -> None:
    conv = await harness.conversation("alice")
    alice = await harness.connect("alice")
    await alice.join(conv)
    for i in range(5):
        ack = await alice.send(conv, f"m{i}")
        await alice.reply(ack.message_id)
    latest = await alice.history(conv, limit=4)
    assert [m.offset for m in latest.messages] == [7, 8, 9, 10] and latest.has_more
    older = await alice.history(conv, before=7, limit=4)
    assert [m.offset for m in older.messages] == [3, 4, 5, 6] and older.has_more
    oldest = await alice.history(conv, before=3, limit=4)
    assert [m.offset for m in oldest.messages] == [1, 2] and not oldest.has_more
    assert oldest.messages[0].text == "m0" and oldest.messages[1].role == "assistant"


async def test_history_beyond_the_window_comes_from_the_store(make_harness) -> None:  # type: ignore[no-untyped-def]
    """Whole, though the messages just below the window are still on their way to the store
    (the writer paces its batches 300 ms apart here: they left the window before that)."""
    harness: Harness = await make_harness(
        window_size=4, join_messages=4, batch_interval_ms=300, batch_wait_ms=300
    )
    conv = await harness.conversation("alice")
    alice = await harness.connect("alice")
    await alice.join(conv)
    for i in range(5):
        ack = await alice.send(conv, f"m{i}")
        await alice.reply(ack.message_id)
    page = await alice.history(conv, limit=10)
    assert [m.offset for m in page.messages] == list(range(1, 11))
    assert not page.has_more
    page = await alice.history(conv, before=9, limit=6)
    assert [m.offset for m in page.messages] == [3, 4, 5, 6, 7, 8] and page.has_more


async def test_history_waits_for_the_store_only_so_long(make_harness, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A store that does not catch up (the writer paces its batches a minute apart here):
    the page comes after the bounded wait, with what is stored, not never."""
    from chatserver import conversations

    monkeypatch.setattr(conversations, "STORE_CATCH_UP_S", 0.2)
    harness: Harness = await make_harness(
        window_size=4, join_messages=4, batch_interval_ms=60_000, batch_wait_ms=60_000
    )
    conv = await harness.conversation("alice")
    alice = await harness.connect("alice")
    await alice.join(conv)
    for i in range(4):
        ack = await alice.send(conv, f"m{i}")
        await alice.reply(ack.message_id)
    loop = asyncio.get_running_loop()
    asked_at = loop.time()
    page = await alice.history(conv, limit=10)
    waited = loop.time() - asked_at
    offsets = [m.offset for m in page.messages]
    # The window, below it what the first batch stored (the first exchange at most): a hole.
    assert offsets[-4:] == [5, 6, 7, 8] and len(offsets) < 8
    assert 0.2 <= waited < 5


async def test_ping_echoes_ts(harness: Harness, encoding: Encoding) -> None:
    alice = await harness.connect("alice", encoding)
    for ts in (0, 12345678901, 1.5, "abc"):
        assert (await alice.ping(ts)).ts == ts


async def test_send_to_unknown_conversation_is_not_found(harness: Harness) -> None:
    alice = await harness.connect("alice")
    await alice.send_raw(
        '{"type":"send","conversation_id":"00000000-0000-0000-0000-000000000000",'
        '"client_msg_id":"x","text":"hi","ref":"r"}'
    )
    error = await alice.expect(ErrorFrame)
    assert (error.code, error.ref) == (ErrorCode.NOT_FOUND.value, "r")


@pytest.mark.parametrize("auth", ["header", "frame", "query"])
async def test_every_auth_route_gives_hello(harness: Harness, auth: str) -> None:
    client = await harness.connect("dana", auth=auth)
    assert client.hello is not None
    assert client.hello.user_id == "dana" and client.hello.protocol == 1
    assert client.hello.max_frame_bytes == 64 * 1024


async def test_many_clients_of_one_user_all_get_messages(harness: Harness) -> None:
    conv = await harness.conversation("alice")
    tabs: list[ChatClient] = [await harness.connect("alice") for _ in range(3)]
    for tab in tabs:
        await tab.join(conv)
    ack = await tabs[0].send(conv, "to all my tabs")
    got = await asyncio.gather(*(t.expect(MessageEvent) for t in tabs))
    assert {g.message.id for g in got} == {ack.message_id}
