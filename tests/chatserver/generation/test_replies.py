"""Agent replies: streaming, cancel, joining mid-reply, slow consumers."""

from __future__ import annotations

import time

from chatclient.client import ChatClient
from chatserver import keys
from protocol import CloseCode, Delta, ErrorCode, ErrorFrame, GenEnd, GenStart, MessageEvent

from ..conftest import Harness, MakeHarness, eventually, outbox_drained
from ..rawws import RawWebSocket

LONG = " ".join(f"word{i}" for i in range(60))


async def test_cancel_stops_the_provider_within_50ms(make_harness: MakeHarness) -> None:
    harness = await make_harness(local_ttft_ms=5, local_token_ms=40)
    conv = await harness.conversation("alice", members=["bob"])
    alice = await harness.connect("alice")
    bob = await harness.connect("bob")
    await alice.join(conv)
    await bob.join(conv)
    ack = await alice.send(conv, LONG)
    start = await bob.expect(GenStart)
    await bob.expect(Delta, lambda d: d.seq >= 2)
    provider = harness.app[keys.GENERATION].provider
    assert provider.active == 1
    sent = time.perf_counter()
    await bob.cancel(start.generation_id)  # any member may stop the reply
    end = await alice.expect(GenEnd, lambda e: e.generation_id == start.generation_id)
    elapsed = time.perf_counter() - sent
    assert provider.active == 0, "the provider stream is still running"
    assert elapsed < 0.05, f"cancel took {elapsed * 1000:.1f} ms"
    assert end.finish_reason == "cancelled"
    assert end.message is not None and end.message.finish_reason == "cancelled"
    full = f"You said: {LONG}"
    assert 0 < len(end.message.text) < len(full) and full.startswith(end.message.text)
    assert end.message.reply_to == ack.message_id
    # Stored as cancelled: visible in history and, once flushed, in the SQLite store.
    page = await alice.history(conv)
    assert page.messages[-1].finish_reason == "cancelled"
    await outbox_drained(harness.app)
    stored = await harness.app[keys.STORE].messages_before(conv, None, 10)
    assert stored.messages[-1].finish_reason == "cancelled"
    assert stored.messages[-1].text == end.message.text


async def test_cancel_of_unknown_or_foreign_generation(harness: Harness) -> None:
    conv = await harness.conversation("alice")
    alice = await harness.connect("alice")
    mallory = await harness.connect("mallory")
    await alice.join(conv)
    await mallory.send_raw(
        '{"type":"cancel","generation_id":"0d9a6c1e-5f3b-4a2c-9d8e-7f6a5b4c3d2e","ref":"c"}'
    )
    error = await mallory.expect(ErrorFrame)
    assert (error.code, error.ref) == (ErrorCode.NOT_FOUND.value, "c")
    harness.app[keys.GENERATION].provider.token_s = 0.05
    ack = await alice.send(conv, LONG)
    start = await alice.expect(GenStart)
    await mallory.send_raw('{"type":"cancel","generation_id":"%s","ref":"m"}' % start.generation_id)
    error = await mallory.expect(ErrorFrame)
    assert error.code == ErrorCode.FORBIDDEN.value
    harness.app[keys.GENERATION].provider.token_s = 0.001
    reply = await alice.follow(start.generation_id, start)
    assert reply.end is not None and reply.end.finish_reason == "stop"
    assert reply.end.message is not None and reply.end.message.reply_to == ack.message_id


async def test_joining_mid_reply_sees_every_character_once(make_harness: MakeHarness) -> None:
    harness = await make_harness(local_ttft_ms=5, local_token_ms=10)
    conv = await harness.conversation("alice", members=["bob"])
    alice = await harness.connect("alice")
    await alice.join(conv)
    await alice.send(conv, LONG)
    start = await alice.expect(GenStart)
    fifth = await alice.expect(Delta, lambda d: d.seq == 5)
    bob = await harness.connect("bob")
    joined = await bob.join(conv)
    assert joined.generation is not None
    assert joined.generation.generation_id == start.generation_id
    assert joined.generation.seq >= 5
    rest = await bob.follow(start.generation_id)
    assert rest.end is not None and rest.end.message is not None
    seqs = [d.seq for d in rest.deltas]
    assert seqs == list(range(joined.generation.seq + 1, joined.generation.seq + 1 + len(seqs)))
    assert joined.generation.text + rest.text == rest.end.message.text
    full = await alice.follow(start.generation_id, start)
    everything = sorted([*full.deltas, fifth], key=lambda d: d.seq)
    assert "".join(d.text for d in everything) == rest.end.message.text
    assert not any(isinstance(f, GenStart) for f in bob.pending())


async def test_replies_in_one_conversation_run_one_after_another(harness: Harness) -> None:
    conv = await harness.conversation("alice")
    alice = await harness.connect("alice")
    await alice.join(conv)
    first = await alice.send(conv, "first question")
    second = await alice.send(conv, "second question")
    r1 = await alice.reply(first.message_id)
    r2 = await alice.reply(second.message_id)
    assert r1.end is not None and r2.end is not None
    assert r1.end.message is not None and r2.end.message is not None
    assert r2.end.message.offset > r1.end.message.offset
    assert "second question" in r2.text


async def test_too_many_pending_replies_are_refused(make_harness: MakeHarness) -> None:
    harness = await make_harness(local_ttft_ms=200, max_queued_replies=1)
    conv = await harness.conversation("alice")
    alice = await harness.connect("alice")
    await alice.send(conv, "one")
    await alice.send(conv, "two")
    await alice.send_raw(
        '{"type":"send","conversation_id":"%s","client_msg_id":"x3","text":"three","ref":"r3"}'
        % conv
    )
    error = await alice.expect(ErrorFrame)
    assert (error.code, error.ref) == (ErrorCode.RATE_LIMITED.value, "r3")
    assert error.retry_after_ms is not None and error.retry_after_ms > 0
    assert [m.text for m in (await alice.history(conv)).messages] == ["one", "two"]


async def test_a_client_that_stops_reading_is_closed_4408(make_harness: MakeHarness) -> None:
    limit = 64 * 1024
    harness = await make_harness(send_buffer_bytes=limit, max_queued_replies=1000)
    conv = await harness.conversation("alice", members=["bob", "carol"])
    assert harness.server.port is not None
    slow = await RawWebSocket.connect("127.0.0.1", harness.server.port, await harness.token("bob"))
    await slow.send_text('{"type":"join","conversation_id":"%s"}' % conv)
    connections = harness.app[keys.STATE].connections
    await eventually(
        lambda: any(c.session and conv in c.session.subscriptions for c in connections)
    )
    slow_conn = next(c for c in connections if c.session and c.session.user_id == "bob")
    alice = await harness.connect("alice")
    carol = await harness.connect("carol")
    await carol.join(conv)
    metrics = harness.app[keys.METRICS]
    text = "x" * 7000
    sent = 0
    # Push several times the bound at a reader that never reads.
    while metrics.slow_consumers._value.get() == 0:
        await alice.send(conv, text)
        sent += 1
        assert sent < 2000, "the slow consumer was never cut off"
        assert slow_conn.outbound.buffered_bytes() <= limit + 16 * 1024
    assert slow_conn not in connections or slow_conn.outbound.closed
    # The well-behaved member kept getting everything, in order.
    offsets = [(await carol.expect(MessageEvent)).message.offset for _ in range(sent)]
    assert offsets == sorted(offsets) and len(offsets) == sent
    # The slow client, reading at last, finds its frames and then the 4408 close.
    frames, code = await slow.read_until_close()
    assert code == CloseCode.SLOW_CONSUMER
    assert frames > 0
    slow.close()
    await eventually(lambda: slow_conn not in connections)
    assert all(s.user_id != "bob" for s in harness.app[keys.HUB].sessions)


async def test_fast_clients_are_not_cut_off(make_harness: MakeHarness) -> None:
    harness = await make_harness(send_buffer_bytes=64 * 1024, max_queued_replies=1000)
    conv = await harness.conversation("alice", members=["bob"])
    alice = await harness.connect("alice")
    bob: ChatClient = await harness.connect("bob")
    await bob.join(conv)
    for _ in range(40):
        await alice.send(conv, "y" * 7000)
    for _ in range(40):
        await bob.expect(MessageEvent)
    assert harness.app[keys.METRICS].slow_consumers._value.get() == 0


async def test_a_queued_question_is_answered_from_the_context_up_to_it(
    make_harness: MakeHarness,
) -> None:
    """Questions asked while a reply streams wait their turn; when one's comes, the context
    it reads holds the questions queued behind it too: they are theirs to answer."""
    harness = await make_harness(local_ttft_ms=200)
    conv = await harness.conversation("alice")
    alice = await harness.connect("alice")
    await alice.join(conv)
    streaming = await alice.send(conv, "a long one first")
    queued = [await alice.send(conv, f"queued question {i}") for i in range(2)]
    assert (await alice.reply(streaming.message_id)).end is not None
    for i, sent in enumerate(queued):
        reply = await alice.reply(sent.message_id)
        assert reply.text.startswith(f"You said: queued question {i} "), reply.text
