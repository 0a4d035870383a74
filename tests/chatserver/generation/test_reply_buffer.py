"""Conformance of resume buffers (memory and Redis), and Redis lease takeover."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError

from chatserver.generation.buffer import LeaseLost, Record, ReplyBuffer, ReplyOwner
from chatserver.generation.redis_buffer import RedisReplyBuffer
from chatserver.redis_ticks import TickPipelinedRedis
from tests.services import RedisServer


def _owner(gen: str = "g1", conv: str = "c1", server: str = "server-a") -> ReplyOwner:
    return ReplyOwner(conv, gen, server, "general", "gemini-2.5-flash", "m1")


async def test_text_so_far_and_last_seq(buffer: ReplyBuffer) -> None:
    assert await buffer.snapshot("c1") is None
    assert await buffer.begin(_owner())
    snap = await buffer.snapshot("c1")
    assert snap is not None and (snap.generation_id, snap.seq, snap.text) == ("g1", 0, "")
    await buffer.append("c1", "g1", 1, "Hello ")
    await buffer.append("c1", "g1", 2, "world")
    snap = await buffer.snapshot("c1")
    assert snap is not None and (snap.seq, snap.text) == (2, "Hello world")
    assert await buffer.owner_of("g1") == _owner()
    assert await buffer.owner_of("nope") is None


async def test_one_live_reply_per_conversation(buffer: ReplyBuffer) -> None:
    assert await buffer.begin(_owner("g1"))
    assert not await buffer.begin(_owner("g2"))
    assert await buffer.begin(_owner("g3", conv="c2"))  # other conversations are free
    await buffer.end("c1", "g1")
    assert await buffer.begin(_owner("g2"))


async def test_end_clears_only_its_own_generation(buffer: ReplyBuffer) -> None:
    assert await buffer.begin(_owner("g1"))
    await buffer.end("c1", "other")
    assert await buffer.snapshot("c1") is not None
    with pytest.raises(LeaseLost):
        await buffer.append("c1", "other", 1, "ignored")
    snap = await buffer.snapshot("c1")
    assert snap is not None and snap.text == ""
    await buffer.end("c1", "g1")
    assert await buffer.snapshot("c1") is None
    assert await buffer.owner_of("g1") is None


async def test_live_replies_are_not_claimable(buffer: ReplyBuffer) -> None:
    assert await buffer.begin(_owner("g1"))
    await buffer.heartbeat()
    assert await buffer.expired() == []
    assert await buffer.claim("c1", "g1") is None
    assert await buffer.snapshot("c1") is not None


async def test_a_dead_owners_reply_is_claimed_once(redis_url: str) -> None:
    redis = Redis.from_url(redis_url)
    # a lease of 1 s: the reply's data lives 12 leases, so a busy machine's pause between
    # seeing the lease run out and the claims cannot outlast the data itself
    dead = RedisReplyBuffer(redis, server_id="server-a", lease_s=1.0)
    alive = RedisReplyBuffer(redis, server_id="server-b", lease_s=1.0)
    try:
        assert await dead.begin(_owner("g1"))
        await dead.append("c1", "g1", 1, "partial ")
        await dead.append("c1", "g1", 2, "text")
        assert await alive.expired() == []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while not await alive.expired():  # the lease runs out on Redis' clock
            assert loop.time() < deadline
            await asyncio.sleep(0.02)
        assert await alive.expired() == [("c1", "g1")]
        claims = await asyncio.gather(alive.claim("c1", "g1"), alive.claim("c1", "g1"))
        won = [c for c in claims if c is not None]
        assert len(won) == 1
        assert won[0].text == "partial text" and won[0].seq == 2
        assert won[0].owner == _owner("g1")
        assert await alive.expired() == []
        assert await alive.snapshot("c1") is None
        # The old owner waking up finds it lost the reply.
        with pytest.raises(LeaseLost):
            await dead.append("c1", "g1", 3, " more")
    finally:
        await redis.aclose()


async def test_only_the_owner_records(redis_url: str) -> None:
    redis = Redis.from_url(redis_url)
    owner = RedisReplyBuffer(redis, server_id="server-a", lease_s=0.3)
    other = RedisReplyBuffer(redis, server_id="server-b", lease_s=0.3)
    try:
        assert await owner.begin(_owner("g1"))
        with pytest.raises(LeaseLost):
            await other.append("c1", "g1", 1, "not mine")
        ttl = await redis.pttl("chat:{c1}:reply")
        assert 0 < ttl <= 3_600  # 12 leases of 0.3 s
        # begin makes no text key; the first record makes it, with the hash's time to live.
        assert not await redis.exists("chat:{c1}:reply_text")
        await owner.append("c1", "g1", 1, "mine")
        assert 0 < await redis.pttl("chat:{c1}:reply_text") <= 3_600
        assert 0 < await redis.pttl("chat:{inst-server-a}:alive") <= 300
    finally:
        await redis.aclose()


async def test_a_reply_is_watched_when_another_instance_has_a_member_in(redis_url: str) -> None:
    redis = Redis.from_url(redis_url)
    buffer = RedisReplyBuffer(redis, server_id="server-a")
    try:
        await redis.sadd("chat:{c1}:watchers", "server-a")  # only ourselves
        slot = await buffer.begin(_owner("g1"))
        assert slot is not None and not slot.watched
        running = await buffer.running("c1")
        assert running is not None and not running.watched and running.owner == "server-a"
        # A checkpoint switching it to watched records the text so far in one step.
        assert await buffer.record([Record("c1", "g1", 3, "a b c", mark_watched=True)]) == set()
        running = await buffer.running("c1")
        assert running is not None and running.watched
        assert (running.snapshot.seq, running.snapshot.text) == (3, "a b c")
        await buffer.end("c1", "g1")
        await redis.sadd("chat:{c2}:watchers", "server-a", "server-b")
        slot = await buffer.begin(_owner("g2", conv="c2"))
        assert slot is not None and slot.watched
    finally:
        await redis.aclose()


async def test_a_batch_of_deltas_is_recorded_and_a_lost_one_reported(buffer: ReplyBuffer) -> None:
    assert await buffer.begin(_owner("g1", conv="c1"))
    assert await buffer.begin(_owner("g2", conv="c2"))
    lost = await buffer.append_many(
        [("c1", "g1", 1, "Hello "), ("c2", "g2", 1, "Bonjour "), ("c1", "g1", 2, "world")]
    )
    assert lost == set()
    one, two = await buffer.snapshot("c1"), await buffer.snapshot("c2")
    assert one is not None and (one.seq, one.text) == (2, "Hello world")
    assert two is not None and (two.seq, two.text) == (1, "Bonjour ")
    await buffer.end("c2", "g2")
    # One reply of the batch is gone (ended, or taken over): only that one is reported.
    lost = await buffer.append_many([("c1", "g1", 3, "!"), ("c2", "g2", 2, "monde")])
    assert lost == {"g2"}
    one = await buffer.snapshot("c1")
    assert one is not None and (one.seq, one.text) == (3, "Hello world!")
    assert await buffer.snapshot("c2") is None


async def test_a_delta_sent_twice_is_recorded_once(redis_url: str) -> None:
    """A pipeline retried after a dropped connection resends deltas Redis may have run."""
    redis = Redis.from_url(redis_url)
    buffer = RedisReplyBuffer(redis, server_id="server-a", lease_s=5)
    try:
        assert await buffer.begin(_owner("g1"))
        await buffer.append_many([("c1", "g1", 1, "one "), ("c1", "g1", 2, "two")])
        await buffer.append_many([("c1", "g1", 2, "two"), ("c1", "g1", 3, " three")])
        await buffer.append("c1", "g1", 3, " three")
        snap = await buffer.snapshot("c1")
        assert snap is not None and (snap.seq, snap.text) == (3, "one two three")
    finally:
        await redis.aclose()


async def test_the_first_reply_to_wait_for_the_conversation_goes_next(redis_url: str) -> None:
    # Two instances, one sender each in one conversation, each asking again as soon as its
    # reply ends: the one that waits must not lose the slot to the other for ever.
    redis = Redis.from_url(redis_url)
    a = RedisReplyBuffer(redis, server_id="server-a", lease_s=5)
    b = RedisReplyBuffer(redis, server_id="server-b", lease_s=5)
    try:
        assert await a.begin(_owner("a1", server="server-a"))
        assert not await b.begin(_owner("b1", server="server-b"))  # waits: next in line
        await a.end("c1", "a1")
        assert not await a.begin(_owner("a2", server="server-a"))  # asks again at once
        assert await b.begin(_owner("b1", server="server-b"))  # the waiter's turn
        assert not await a.begin(_owner("a2", server="server-a"))  # now a2 waits ...
        await b.end("c1", "b1")
        assert not await b.begin(_owner("b2", server="server-b"))
        assert await a.begin(_owner("a2", server="server-a"))  # ... and goes next
    finally:
        await redis.aclose()


@pytest.mark.parametrize("client", [Redis, TickPipelinedRedis])
async def test_a_batch_survives_redis_forgetting_its_scripts(
    redis_url: str, client: type[Redis]
) -> None:
    redis = client.from_url(redis_url)
    buffer = RedisReplyBuffer(redis, server_id="server-a", lease_s=5)
    try:
        assert await buffer.begin(_owner("g1"))
        await buffer.append_many([("c1", "g1", 1, "before ")])
        await redis.script_flush()  # as after a Redis restart
        assert await buffer.append_many([("c1", "g1", 2, "after")]) == set()
        snap = await buffer.snapshot("c1")
        assert snap is not None and (snap.seq, snap.text) == (2, "before after")
    finally:
        await redis.aclose()


async def test_a_batch_across_a_clusters_slots(redis_cluster_url: str) -> None:
    redis = RedisCluster.from_url(redis_cluster_url)
    buffer = RedisReplyBuffer(redis, server_id="server-a", lease_s=5)
    try:
        conversations = [f"c{i}" for i in range(100)]  # spread over the three masters
        for conv in conversations:
            assert await buffer.begin(_owner(f"g-{conv}", conv=conv))
        await buffer.end("c7", "g-c7")
        lost = await buffer.append_many([(c, f"g-{c}", 1, f"to {c}") for c in conversations])
        assert lost == {"g-c7"}
        for conv in conversations:
            snap = await buffer.snapshot(conv)
            if conv == "c7":
                assert snap is None
            else:
                assert snap is not None and (snap.seq, snap.text) == (1, f"to {conv}")
    finally:
        await redis.aclose()


async def test_an_earlier_run_under_the_same_id_is_swept_by_the_next(redis_url: str) -> None:
    """A fixed server id started again within a lease is alive at once: what its earlier
    run was streaming is found by its own first sweep, not left to the slot's TTL."""
    redis = Redis.from_url(redis_url)
    before = RedisReplyBuffer(redis, server_id="fixed", lease_s=5.0)
    after = RedisReplyBuffer(redis, server_id="fixed", lease_s=5.0)
    try:
        await before.heartbeat()
        assert await before.begin(_owner("g1", server="fixed"))
        await before.append("c1", "g1", 1, "cut here")
        await after.start()
        await after.heartbeat()  # alive: no other instance will ever sweep it
        assert await after.begin(_owner("g2", conv="c2", server="fixed"))  # this run's own
        assert await after.expired() == [("c1", "g1")]
        claimed = await after.claim("c1", "g1")
        assert claimed is not None and claimed.text == "cut here"
        assert await after.snapshot("c1") is None
        assert await after.expired() == []  # only once, and never this run's own replies
        assert await after.snapshot("c2") is not None
    finally:
        await redis.aclose()


async def test_a_reply_of_an_earlier_incarnation_is_a_dead_owners(redis_url: str) -> None:
    """Alive is the owner's key set by the incarnation that began the reply: a claimer (the
    reply's job claimed elsewhere) takes a reply of a run that was started again."""
    redis = Redis.from_url(redis_url)
    before = RedisReplyBuffer(redis, server_id="fixed", lease_s=5.0)
    after = RedisReplyBuffer(redis, server_id="fixed", lease_s=5.0)
    other = RedisReplyBuffer(redis, server_id="other", lease_s=5.0)
    try:
        await before.heartbeat()
        assert await before.begin(_owner("g1", server="fixed"))
        await before.append("c1", "g1", 1, "cut here")
        assert await other.claim("c1", "g1") is None  # its incarnation is alive
        await after.start()
        await after.heartbeat()  # the same id alive again, another incarnation
        assert await after.begin(_owner("g2", conv="c2", server="fixed"))
        claimed = await other.claim("c1", "g1")
        assert claimed is not None and claimed.text == "cut here"
        assert await other.claim("c2", "g2") is None  # the live incarnation's own
        assert await after.expired() == [("c1", "g1")]  # its sweep finds it taken: nothing
        assert await after.claim("c1", "g1") is None
    finally:
        await redis.aclose()


async def test_a_heartbeat_that_failed_has_the_next_begin_set_the_alive_key() -> None:
    """A heartbeat lost to a Redis restart may leave no alive key (its lease ran out while
    Redis was away): the next reply sets it with its slot, and no append takes a slot
    before that, or the others would sweep a live instance's replies as a dead one's."""
    server = RedisServer()
    server.start()
    redis = Redis.from_url(server.url, socket_connect_timeout=1)
    buffer = RedisReplyBuffer(redis, server_id="server-a", lease_s=30.0)
    owner = _owner("g1")
    try:
        await buffer.heartbeat()
        server.stop()
        with pytest.raises(RedisConnectionError):
            await buffer.heartbeat()
        server.start()  # empty: the alive key went with the restart
        assert buffer.slot_follow(owner, "m", 10) is None  # liveness first, in begin
        assert await buffer.begin(owner)
        assert await redis.get("chat:{inst-server-a}:alive") == buffer.incarnation.encode()
    finally:
        await redis.aclose()
        server.close()
