"""What only the Redis window has: the Lua append, key TTLs, flushes and the cluster path.

Every test runs on a single Redis and on a three-master Redis Cluster (``redis_clients``).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import pytest

from protocol import Usage
from storage import MemoryOutbox, MessageDraft, WindowMissing
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
