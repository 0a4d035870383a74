"""One conformance suite for every broker, and what crosses instances on Redis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from chatserver.fanout.broker.base import Broker
from chatserver.fanout.broker.memory import MemoryBroker
from chatserver.fanout.broker.redis import RedisBroker
from chatserver.fanout.envelope import (
    CancelReply,
    Control,
    ControlEnvelope,
    Envelope,
    WatchAck,
    WatchReply,
    unpack,
)
from chatserver.fanout.events import DeltaTemplate, Event
from storage.redis_keys import ConversationKeys

from ..conftest import eventually

Made = tuple[Broker, list[Event]]


@pytest.fixture
async def make_broker(
    request: pytest.FixtureRequest,
) -> AsyncIterator[Callable[[str, str], asyncio.Future[Made]]]:
    made: list[Broker] = []
    clients: list[Redis | RedisCluster] = []

    async def make(kind: str, server_id: str) -> Made:
        received: list[Event] = []
        broker: Broker
        if kind == "memory":
            broker = MemoryBroker(server_id)
        elif kind == "redis":
            redis = Redis.from_url(request.getfixturevalue("redis_url"))
            clients.append(redis)
            broker = RedisBroker(redis, server_id=server_id)
        else:
            cluster = RedisCluster.from_url(request.getfixturevalue("redis_cluster_url"))
            await cluster.initialize()
            clients.append(cluster)
            broker = RedisBroker(cluster, server_id=server_id, cluster=True)
        await broker.start(received.append)
        made.append(broker)
        return broker, received

    yield make  # type: ignore[misc]
    for broker in made:
        await broker.close()
    for redis in clients:
        await redis.aclose()


@pytest.fixture(params=["memory", "redis", "redis-cluster"])
async def broker(request: pytest.FixtureRequest, make_broker) -> Made:  # type: ignore[no-untyped-def]
    return await make_broker(request.param, "server-a")  # type: ignore[no-any-return]


def _typing(conv: str, n: int) -> Event:
    return Event(conv, {"type": "typing", "conversation_id": conv, "user_id": f"u{n}"}, 1.0)


async def test_subscribed_conversations_are_delivered_in_order(broker: Made) -> None:
    made, received = broker
    await made.subscribe("c1")
    for n in range(5):
        await made.publish(_typing("c1", n))
    assert [e.frame["user_id"] for e in received] == [f"u{n}" for n in range(5)]
    assert made.healthy()


async def test_own_publications_arrive_once(broker: Made) -> None:
    made, received = broker
    controls: list[Control] = []
    made.on_control = controls.append
    await made.subscribe("c1")
    await made.subscribe("c2")
    await made.publish(_typing("c1", 1))
    await made.publish(_typing("c2", 2))
    # Announcements travel each channel behind the events published on it before them: once
    # both are back, so are the echoes of our own publications (dropped, or delivered twice).
    await made.announce("c1", CancelReply("after-c1"))
    await made.announce("c2", CancelReply("after-c2"))
    await eventually(lambda: len(controls) == 2, what="the announcements back")
    assert sorted(c.generation_id for c in controls if isinstance(c, CancelReply)) == [
        "after-c1",
        "after-c2",
    ]
    assert [e.frame["user_id"] for e in received] == ["u1", "u2"]


async def test_control_messages_reach_their_instance(broker: Made) -> None:
    made, _ = broker
    got: list[Control] = []
    made.on_control = got.append
    await made.send_control(made.server_id, CancelReply("g"))
    await eventually(lambda: got == [CancelReply("g")])


@pytest.mark.parametrize("kind", ["redis", "redis-cluster"])
async def test_events_cross_instances_once_in_order(make_broker, kind: str) -> None:  # type: ignore[no-untyped-def]
    a, from_a = await make_broker(kind, "server-a")
    b, from_b = await make_broker(kind, "server-b")
    c, from_c = await make_broker(kind, "server-c")
    await b.subscribe("c1")
    await c.subscribe("c2")
    for n in range(50):
        await a.publish(_typing("c1", n))
    await a.publish(_typing("c2", 99))
    await eventually(lambda: len(from_b) == 50 and len(from_c) == 1)
    assert [e.frame["user_id"] for e in from_b] == [f"u{n}" for n in range(50)]
    assert all(e.published_at == 1.0 for e in from_b)
    assert from_a == []  # no local room on a; its echoes are dropped
    await b.unsubscribe("c1")
    await a.publish(_typing("c1", 100))
    await a.publish(_typing("c2", 101))
    await eventually(lambda: len(from_c) == 2)
    assert len(from_b) == 50


def _delta(conv: str, seq: int) -> Event:
    return DeltaTemplate(conv, f"g-{conv}").event(seq, f"word{seq} ", 0.0)


async def test_a_batch_is_delivered_in_order_unstamped(broker: Made) -> None:
    made, received = broker
    await made.subscribe("c1")
    await made.subscribe("c2")
    batch = [_delta("c1" if n % 2 else "c2", n) for n in range(1, 9)] + [_delta("c3", 9)]
    await made.publish_many(batch)
    await made.publish_many([])
    assert received == batch[:8]  # c3 has no local member; the batch's order is kept
    assert all(e.published_at == 0.0 for e in received)  # delivered in the call: not timed


@pytest.mark.parametrize("kind", ["redis", "redis-cluster"])
async def test_a_batch_crosses_instances_in_order_and_stamped(make_broker, kind: str) -> None:  # type: ignore[no-untyped-def]
    a, from_a = await make_broker(kind, "server-a")
    b, from_b = await make_broker(kind, "server-b")
    await a.subscribe("c1")
    await b.subscribe("c1")
    await a.publish(_typing("c1", 0))
    await a.publish_many([_delta("c1", n) for n in range(1, 41)])
    await a.publish(_typing("c1", 41))
    await eventually(lambda: len(from_b) == 42)
    for got in (from_a, from_b):
        frames = [e.frame for e in got]
        assert [f.get("seq") for f in frames[1:41]] == list(range(1, 41))
        assert frames[0]["user_id"] == "u0" and frames[41]["user_id"] == "u41"
    assert all(e.published_at > 0 for e in from_b)  # the other instance times them
    assert [e.framed(False) for e in from_b[1:41]] == [e.framed(False) for e in from_a[1:41]]


@pytest.mark.parametrize("kind", ["redis", "redis-cluster"])
async def test_control_crosses_instances(make_broker, kind: str) -> None:  # type: ignore[no-untyped-def]
    a, _ = await make_broker(kind, "server-a")
    b, _ = await make_broker(kind, "server-b")
    got: list[Control] = []
    b.on_control = got.append
    await a.send_control("server-b", CancelReply("g1"))
    await eventually(lambda: got == [CancelReply("g1")])


@pytest.mark.parametrize("kind", ["redis", "redis-cluster"])
async def test_watchers_and_announcements(  # type: ignore[no-untyped-def]
    make_broker, kind: str, request: pytest.FixtureRequest
) -> None:
    """Subscribing puts the instance in the conversation's watchers set (unsubscribing takes
    it out); an announcement reaches every instance subscribed."""
    a, _ = await make_broker(kind, "server-a")
    b, _ = await make_broker(kind, "server-b")
    redis: Redis | RedisCluster
    if kind == "redis":
        redis = Redis.from_url(request.getfixturevalue("redis_url"))
    else:
        redis = RedisCluster.from_url(request.getfixturevalue("redis_cluster_url"))
    got: list[Control] = []
    b.on_control = got.append
    watchers = ConversationKeys("chat", "c-w").watchers
    await b.subscribe("c-w")
    assert {m.decode() for m in await redis.smembers(watchers)} == {"server-b"}
    ack = WatchAck("c-w", "g1", 7)
    await a.announce("c-w", ack)
    await eventually(lambda: got == [ack])
    await b.unsubscribe("c-w")
    assert await redis.smembers(watchers) == set()
    await redis.aclose()


async def test_deliver_local_reaches_only_local_members(broker: Made) -> None:
    made, received = broker
    await made.subscribe("c1")
    made.deliver_local([_typing("c1", 1), _typing("c2", 2)])
    assert [e.frame["user_id"] for e in received] == ["u1"]


def test_envelopes_round_trip() -> None:
    event = Envelope("server-a", 12.5, "c1", {"type": "delta", "seq": 1})
    assert unpack(event.pack()) == event
    for control in (CancelReply("g"), WatchReply("c", "g"), WatchAck("c", "g", 3)):
        assert unpack(ControlEnvelope("server-a", control).pack()) == ControlEnvelope(
            "server-a", control
        )
    assert unpack(b"\x93junk") is None
    assert (
        unpack(ControlEnvelope("s", CancelReply("g")).pack().replace(b"cancel", b"cancex")) is None
    )


async def test_reconnects_after_redis_restarts_and_reports_the_gap(redis_server) -> None:  # type: ignore[no-untyped-def]
    redis_server.start() if not redis_server.running else None
    redis = Redis.from_url(redis_server.url)
    sender = Redis.from_url(redis_server.url)
    gaps: list[int] = []
    received: list[Event] = []
    broker = RedisBroker(redis, server_id="server-a", on_gap=lambda: gaps.append(1))
    other = RedisBroker(sender, server_id="server-b")
    await broker.start(received.append)
    await other.start(lambda e: None)
    try:
        await broker.subscribe("c1")
        redis_server.stop()
        await eventually(lambda: not broker.healthy(), timeout=10)
        redis_server.start()
        await eventually(lambda: broker.healthy() and gaps == [1], timeout=20)
        await other.publish(_typing("c1", 7))  # the room was resubscribed
        await eventually(lambda: [e.frame["user_id"] for e in received] == ["u7"], timeout=10)
    finally:
        await broker.close()
        await other.close()
        await redis.aclose()
        await sender.aclose()
