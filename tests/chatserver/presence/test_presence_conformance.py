"""One conformance suite for every presence store (memory, Redis, Redis Cluster), and the
expiry that only a shared store has."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from chatserver.presence.base import Change, PresenceStore
from chatserver.presence.memory import MemoryPresence
from chatserver.presence.redis import RedisPresence
from protocol.ids import uuid4_str
from storage.redis_keys import ConversationKeys

from ..conftest import eventually

Make = Callable[[str], PresenceStore]


@pytest.fixture(params=["memory", "redis", "redis-cluster"])
async def make_store(request: pytest.FixtureRequest) -> AsyncIterator[Make]:
    """Stores of one kind, one per instance id, sharing what that kind shares."""
    kind: str = request.param
    clients: list[Redis | RedisCluster] = []
    memory = MemoryPresence()
    if kind == "redis":
        clients.append(Redis.from_url(request.getfixturevalue("redis_url")))
    elif kind == "redis-cluster":
        cluster = RedisCluster.from_url(request.getfixturevalue("redis_cluster_url"))
        await cluster.initialize()
        clients.append(cluster)

    def make(server_id: str) -> PresenceStore:
        if kind == "memory":
            return memory  # one process: every "instance" is the same one
        return RedisPresence(clients[0], server_id=server_id, ttl_s=30)

    yield make
    for client in clients:
        await client.aclose()


@pytest.fixture
def conv() -> str:
    return uuid4_str()


async def test_first_enter_and_last_exit_are_the_changes(make_store: Make, conv: str) -> None:
    store = make_store("a")
    assert await store.online(conv) == ()
    assert await store.enter(conv, "bob") == Change(conv, announce=False)
    assert await store.enter(conv, "bob") is None  # online already
    assert await store.enter(conv, "alice") == Change(conv, announce=False)
    assert await store.online(conv) == ("alice", "bob")
    assert await store.exit(conv, "bob") == Change(conv, announce=False)
    assert await store.exit(conv, "bob") is None  # offline already
    assert await store.online(conv) == ("alice",)
    assert await store.renew({conv: ["alice"]}) == []  # nothing changed
    assert await store.online(conv) == ("alice",)


async def test_conversations_are_apart(make_store: Make) -> None:
    store = make_store("a")
    one, two = uuid4_str(), uuid4_str()
    await store.enter(one, "alice")
    await store.enter(two, "bob")
    assert await store.online(one) == ("alice",)
    assert await store.online(two) == ("bob",)


@pytest.fixture(params=["redis", "redis-cluster"])
async def shared(request: pytest.FixtureRequest) -> AsyncIterator[Redis | RedisCluster]:
    client: Redis | RedisCluster
    if request.param == "redis":
        client = Redis.from_url(request.getfixturevalue("redis_url"))
    else:
        client = RedisCluster.from_url(request.getfixturevalue("redis_cluster_url"))
        await client.initialize()
    yield client
    await client.aclose()


async def test_a_user_on_two_instances_goes_offline_with_the_last(
    shared: Redis | RedisCluster, conv: str
) -> None:
    a = RedisPresence(shared, server_id="a", ttl_s=30)
    b = RedisPresence(shared, server_id="b", ttl_s=30)
    assert await a.enter(conv, "bob") is not None
    assert await b.enter(conv, "bob") is None
    assert await a.online(conv) == await b.online(conv) == ("bob",)
    assert await a.exit(conv, "bob") is None  # still on b
    assert await b.online(conv) == ("bob",)
    assert await b.exit(conv, "bob") is not None
    assert await a.online(conv) == ()


async def test_a_change_is_announced_only_when_another_instance_watches(
    shared: Redis | RedisCluster, conv: str
) -> None:
    a = RedisPresence(shared, server_id="a", ttl_s=30)
    watchers = ConversationKeys("chat", conv).watchers
    await shared.sadd(watchers, "a")  # only a has members joined
    assert await a.enter(conv, "alice") == Change(conv, announce=False)
    await shared.sadd(watchers, "b")
    assert await a.enter(conv, "bob") == Change(conv, announce=True)
    assert await a.exit(conv, "bob") == Change(conv, announce=True)


async def test_a_dead_instances_users_expire_and_a_renewal_reports_it(
    shared: Redis | RedisCluster, conv: str
) -> None:
    dead = RedisPresence(shared, server_id="dead", ttl_s=0.3)  # entries live 200 ms
    live = RedisPresence(shared, server_id="live", ttl_s=30)
    await dead.enter(conv, "bob")
    await live.enter(conv, "alice")
    assert await live.online(conv) == ("alice", "bob")

    async def bob_gone() -> bool:
        return await live.online(conv) == ("alice",)

    await eventually(bob_gone, timeout=5)  # no renewal by `dead`: read as gone at once
    # the next renewal of an instance with members there drops the entry, and says so
    assert await live.renew({conv: ["alice"]}) == [Change(conv, announce=False)]
    assert await live.renew({conv: ["alice"]}) == []
    assert await shared.zcard(ConversationKeys("chat", conv).presence) == 1


async def test_a_renewal_brings_back_an_entry_redis_lost(
    shared: Redis | RedisCluster, conv: str
) -> None:
    a = RedisPresence(shared, server_id="a", ttl_s=30)
    await a.enter(conv, "alice")
    await shared.delete(ConversationKeys("chat", conv).presence)
    assert await a.online(conv) == ()
    assert await a.renew({conv: ["alice"]}) == [Change(conv, announce=False)]
    assert await a.online(conv) == ("alice",)


async def test_entries_and_the_key_carry_their_lifetimes(
    shared: Redis | RedisCluster, conv: str
) -> None:
    a = RedisPresence(shared, server_id="a", ttl_s=30)
    await a.enter(conv, "alice")
    key = ConversationKeys("chat", conv).presence
    assert 0 < await shared.pttl(key) <= 30_000
    (entry, score), *_ = await shared.zrange(key, 0, -1, withscores=True)
    assert entry == b"a\x00alice"
    server_ms = (await shared.time())[0] * 1000
    assert 19_000 <= score - server_ms <= 21_000  # two thirds of the TTL
