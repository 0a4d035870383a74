"""Offsets, epochs and recovery; history that survives a restart."""

from __future__ import annotations

from chatserver import keys
from protocol import MessageEvent, Since

from .conftest import Harness, MakeHarness, outbox_drained


async def _exchange(client, conv: str, text: str) -> None:  # type: ignore[no-untyped-def]
    ack = await client.send(conv, text)
    await client.reply(ack.message_id)


async def test_rejoin_with_since_gets_exactly_the_missed_messages(harness: Harness) -> None:
    conv = await harness.conversation("alice", members=["bob"])
    alice = await harness.connect("alice")
    bob = await harness.connect("bob")
    await alice.join(conv)
    joined = await bob.join(conv)
    await _exchange(alice, conv, "before the drop")
    seen = [await bob.expect(MessageEvent)]
    await bob.reply()
    last = (await bob.history(conv)).messages[-1]
    await bob.close()
    for i in range(3):
        await _exchange(alice, conv, f"while away {i}")
    bob = await harness.connect("bob")
    again = await bob.join(conv, Since(last.offset, joined.epoch))
    assert again.recovered
    assert again.epoch == joined.epoch
    assert [m.offset for m in again.messages] == list(range(last.offset + 1, last.offset + 7))
    assert [m.text for m in again.messages if m.role == "user"] == [
        f"while away {i}" for i in range(3)
    ]
    assert again.offset == again.messages[-1].offset
    assert seen[0].message.offset == 1
    # Live messages continue right after, with no duplicate of the recovered ones.
    ack = await alice.send(conv, "back again")
    live = await bob.expect(MessageEvent)
    assert live.message.offset == ack.offset == again.offset + 1


async def test_rejoin_with_a_stale_epoch_is_not_recovered(harness: Harness) -> None:
    conv = await harness.conversation("alice")
    alice = await harness.connect("alice")
    await alice.join(conv)
    await _exchange(alice, conv, "one")
    again = await alice.join(conv, Since(1, "not-the-epoch"))
    assert not again.recovered
    assert [m.offset for m in again.messages] == [1, 2]


async def test_rejoin_beyond_the_window_is_not_recovered(make_harness: MakeHarness) -> None:
    harness = await make_harness(window_size=4, join_messages=4)
    conv = await harness.conversation("alice")
    alice = await harness.connect("alice")
    joined = await alice.join(conv)
    for i in range(4):
        await _exchange(alice, conv, f"m{i}")
    again = await alice.join(conv, Since(1, joined.epoch))
    assert not again.recovered  # offsets 2..4 left the window: reload with history
    assert [m.offset for m in again.messages] == [5, 6, 7, 8]
    fine = await alice.join(conv, Since(5, joined.epoch))
    assert fine.recovered and [m.offset for m in fine.messages] == [6, 7, 8]


async def test_a_lost_window_gets_a_new_epoch(harness: Harness) -> None:
    conv = await harness.conversation("alice")
    alice = await harness.connect("alice")
    joined = await alice.join(conv)
    await _exchange(alice, conv, "kept")
    await outbox_drained(harness.app)  # the store has the messages before the cache goes
    await harness.app[keys.WINDOW].forget(conv)
    again = await alice.join(conv, Since(2, joined.epoch))
    assert not again.recovered and again.epoch != joined.epoch
    assert [m.offset for m in again.messages] == [1, 2]
    ack = await alice.send(conv, "after the loss")
    assert ack.offset == 3  # offsets are never reused


async def test_a_restarted_server_serves_the_old_history(make_harness: MakeHarness) -> None:
    first = await make_harness()
    conv = await first.conversation("alice")
    alice = await first.connect("alice")
    joined = await alice.join(conv)
    await _exchange(alice, conv, "remember me")
    await alice.close()
    first.clients.clear()
    await first.server.close()  # a clean stop flushes the outbox into SQLite

    second = await make_harness()  # same settings, same SQLite file
    alice = await second.connect("alice")
    again = await alice.join(conv, Since(2, joined.epoch))
    assert not again.recovered and again.epoch != joined.epoch
    assert again.messages[0].text == "remember me"
    assert [m.role for m in again.messages] == ["user", "assistant"]
    page = await alice.history(conv)
    assert [m.offset for m in page.messages] == [1, 2]
    ack = await alice.send(conv, "and now", client_msg_id="after-restart")
    assert ack.offset == 3
    api = await second.api("alice")
    status, body = await api.request("GET", "/api/conversations")
    assert status == 200 and [c["id"] for c in body["items"]] == [conv]
