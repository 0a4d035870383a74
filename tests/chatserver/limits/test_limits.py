"""Per-tier limits: conformance of both limiters, and what a client sees."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from redis.asyncio import Redis

from chatclient.client import ChatError, Closed
from chatserver import keys
from chatserver.limits.base import Limiter, TierLimits, ms_until_next_utc_day, utc_day
from chatserver.limits.memory import MemoryLimiter
from chatserver.limits.redis import RedisLimiter
from protocol import CloseCode, ErrorCode, ErrorFrame, GenStart
from storage import AppendRefused, MessageDraft
from storage.outbox.redis import RedisOutbox
from storage.window.redis import RedisWindow

from ..conftest import Harness, MakeHarness, eventually

TIGHT = TierLimits(messages_per_minute=3, connections=2, daily_tokens=100)


@pytest.fixture(params=["memory", "redis"])
async def limiter(request: pytest.FixtureRequest) -> AsyncIterator[Limiter]:
    async def seed(user_id: str, day: str) -> int:
        return {"heavy": 90}.get(user_id, 0)  # what the store says was used today

    if request.param == "memory":
        yield MemoryLimiter(seed)
        return
    redis = Redis.from_url(request.getfixturevalue("redis_url"))
    yield RedisLimiter(redis, seed)
    await redis.aclose()


async def test_the_bucket_allows_a_minutes_worth_then_says_when(limiter: Limiter) -> None:
    assert [await limiter.check_send("u", TIGHT) for _ in range(3)] == [None, None, None]
    refused = await limiter.check_send("u", TIGHT)
    assert refused is not None and refused.code is ErrorCode.RATE_LIMITED
    assert 0 < refused.retry_after_ms <= 20_000  # one message per 20 s at 3 a minute
    assert await limiter.check_send("other", TIGHT) is None  # per user


async def test_take_is_a_bucket_per_user_and_kind(limiter: Limiter) -> None:
    assert [await limiter.take("u", "rest", 2) for _ in range(2)] == [None, None]
    refused = await limiter.take("u", "rest", 2)
    assert refused is not None and refused.code is ErrorCode.RATE_LIMITED
    assert 0 < refused.retry_after_ms <= 30_000  # one request per 30 s at 2 a minute
    assert await limiter.take("u", "create", 2) is None  # another kind, another bucket
    assert await limiter.take("v", "rest", 2) is None  # another user
    assert await limiter.check_send("u", TIGHT) is None  # not the messages' bucket


async def test_take_is_shared_by_every_instance_through_redis(redis_url: str) -> None:
    async def seed(user_id: str, day: str) -> int:
        return 0

    one, two = Redis.from_url(redis_url), Redis.from_url(redis_url)
    try:
        a, b = RedisLimiter(one, seed), RedisLimiter(two, seed)
        assert await a.take("u", "rest", 2) is None
        assert await b.take("u", "rest", 2) is None
        assert await a.take("u", "rest", 2) is not None
        assert await b.take("u", "rest", 2) is not None
    finally:
        await one.aclose()
        await two.aclose()


async def test_rest_requests_are_rate_limited_per_user_and_tier(make_harness: MakeHarness) -> None:
    harness = await make_harness(
        limits_free="messages_per_minute=20,connections=5,daily_tokens=1000,requests_per_minute=3"
    )
    alice = await harness.api("alice")
    statuses = [(await alice.request("GET", "/api/conversations"))[0] for _ in range(3)]
    assert statuses == [200, 200, 200]
    async with harness.http.get(
        harness.base_url + "/api/conversations", headers=alice._headers()
    ) as resp:
        body = await resp.json()
        assert resp.status == 429 and body["error"]["code"] == "rate_limited"
        assert 0 < body["error"]["retry_after_ms"] <= 20_000
        assert 1 <= int(resp.headers["Retry-After"]) <= 20
    bob = await harness.api("bob")
    assert (await bob.request("GET", "/api/conversations"))[0] == 200
    pro = await harness.api("carol", tier="pro")  # its own tier's rate (600 a minute)
    assert [(await pro.request("GET", "/api/agents"))[0] for _ in range(5)] == [200] * 5


async def test_conversation_creations_per_minute_are_bounded_by_tier(
    make_harness: MakeHarness,
) -> None:
    harness = await make_harness(
        limits_free="messages_per_minute=20,connections=5,daily_tokens=1000,"
        "conversations_per_minute=2"
    )
    alice = await harness.api("alice")
    for _ in range(2):
        await alice.create_conversation()
    status, body = await alice.request("POST", "/api/conversations", json={"agent_id": "general"})
    assert status == 429 and body["error"]["code"] == "rate_limited"
    assert "per minute" in body["error"]["message"] and body["error"]["retry_after_ms"] > 0
    await (await harness.api("bob")).create_conversation()  # per user


async def test_conversations_owned_are_capped_by_tier(make_harness: MakeHarness) -> None:
    harness = await make_harness(
        limits_free="messages_per_minute=20,connections=5,daily_tokens=1000,"
        "conversations=3,conversations_per_minute=100"
    )
    alice = await harness.api("alice")
    for _ in range(3):
        await alice.create_conversation()
    # Another user's conversation naming alice as a member is not hers to count.
    await (await harness.api("bob")).create_conversation(members=["alice"])
    status, body = await alice.request("POST", "/api/conversations", json={"agent_id": "general"})
    assert status == 429 and body["error"]["code"] == "quota_exceeded"
    assert "at most 3 conversations" in body["error"]["message"]
    _, listed = await alice.request("GET", "/api/conversations")
    assert sorted(c["owner_id"] for c in listed["items"]) == ["alice"] * 3 + ["bob"]
    pro = await harness.api("alice2", tier="pro")  # the pro tier's own cap (2,000)
    for _ in range(4):
        await pro.create_conversation()


async def test_connections_are_capped_per_user(limiter: Limiter) -> None:
    assert await limiter.open_connection("u", "c1", TIGHT)
    assert await limiter.open_connection("u", "c2", TIGHT)
    assert not await limiter.open_connection("u", "c3", TIGHT)
    assert await limiter.open_connection("v", "c1", TIGHT)
    await limiter.close_connection("u", "c1")
    assert await limiter.open_connection("u", "c3", TIGHT)
    assert await limiter.open_connection("u", "c3", TIGHT)  # the same one again: still two
    assert not await limiter.open_connection("u", "c4", TIGHT)
    await limiter.close_connection("u", "never-opened")  # changes nothing
    assert not await limiter.open_connection("u", "c4", TIGHT)
    for closed in ("c2", "c3"):
        await limiter.close_connection("u", closed)
    assert await limiter.open_connection("u", "c5", TIGHT)  # none held: two places again
    assert await limiter.open_connection("u", "c6", TIGHT)


async def test_the_daily_quota_starts_from_the_store_and_counts_usage(limiter: Limiter) -> None:
    assert await limiter.check_send("heavy", TIGHT) is None  # 90 of 100 used
    await limiter.add_tokens("heavy", 15)
    refused = await limiter.check_send("heavy", TIGHT)
    assert refused is not None and refused.code is ErrorCode.QUOTA_EXCEEDED
    assert abs(refused.retry_after_ms - ms_until_next_utc_day()) < 5_000
    assert await limiter.check_send("light", TIGHT) is None


async def test_check_send_is_quota_then_rate_in_one_step(limiter: Limiter) -> None:
    assert [await limiter.check_send("u", TIGHT) for _ in range(3)] == [None, None, None]
    refused = await limiter.check_send("u", TIGHT)
    assert (
        refused is not None
        and refused.code is ErrorCode.RATE_LIMITED
        and 0 < refused.retry_after_ms <= 20_000
    )
    # heavy starts at 90 of 100 tokens (the store's figure); over quota, no rate token is taken
    await limiter.add_tokens("heavy", 15)
    for _ in range(5):
        refused = await limiter.check_send("heavy", TIGHT)
        assert refused is not None and refused.code is ErrorCode.QUOTA_EXCEEDED
        assert abs(refused.retry_after_ms - ms_until_next_utc_day()) < 5_000


async def test_a_dead_instances_connections_stop_counting(redis_url: str) -> None:
    redis = Redis.from_url(redis_url)

    async def seed(user_id: str, day: str) -> int:
        return 0

    dead = RedisLimiter(redis, seed, connection_ttl_s=0.2)
    alive = RedisLimiter(redis, seed, connection_ttl_s=0.2)
    try:
        assert await dead.open_connection("u", "c1", TIGHT)
        assert await dead.open_connection("u", "c2", TIGHT)
        assert not await alive.open_connection("u", "c3", TIGHT)

        async def admitted() -> bool:
            return await alive.open_connection("u", "c3", TIGHT)

        await eventually(admitted, timeout=5)  # nobody renewed c1 and c2
    finally:
        await redis.aclose()


async def test_the_send_gate_in_the_appends_script_starts_the_day_then_counts(
    redis_url: str,
) -> None:
    redis = Redis.from_url(redis_url)
    try:
        limiter = RedisLimiter(redis, lambda user_id, day: _seeded(90))
        window = RedisWindow(redis)
        outbox = RedisOutbox(redis, consumer="w")
        await outbox.start()
        await window.rebuild("c1", [], 0)
        draft = MessageDraft(conversation_id="c1", role="user", text="hi", user_id="heavy")
        gate = limiter.send_gate("heavy", TIGHT)
        # No counter today yet (no connection started it): the gate cannot decide ...
        with pytest.raises(AppendRefused) as missing:
            await window.append(draft, outbox, gate)
        assert await limiter.gate_refused("heavy", missing.value.code, missing.value.value) is None
        assert await outbox.backlog() == 0  # ... and nothing was appended
        # ... the counter now starts from the store's 90 of 100: the same gate lets it go.
        assert (await window.append(draft, outbox, gate)).message.offset == 1
        await limiter.add_tokens("heavy", 15)
        with pytest.raises(AppendRefused) as spent:
            await window.append(draft, outbox, gate)
        refusal = await limiter.gate_refused("heavy", spent.value.code, spent.value.value)
        assert refusal is not None and refusal.code is ErrorCode.QUOTA_EXCEEDED
        light = limiter.send_gate("light", TIGHT)  # TIGHT: 3 messages a minute
        await limiter.gate_refused("light", -1, 0)  # starts light's day
        other = MessageDraft(conversation_id="c1", role="user", text="x", user_id="light")
        for _ in range(3):
            await window.append(other, outbox, light)
        with pytest.raises(AppendRefused) as fast:
            await window.append(other, outbox, light)
        refusal = await limiter.gate_refused("light", fast.value.code, fast.value.value)
        assert (
            refusal is not None
            and refusal.code is ErrorCode.RATE_LIMITED
            and refusal.retry_after_ms > 0
        )
        assert await outbox.backlog() == 4
    finally:
        await redis.flushdb()
        await redis.aclose()


async def _seeded(used: int) -> int:
    return used


async def test_a_connection_starts_the_days_counter_off_the_send_path(redis_url: str) -> None:
    redis = Redis.from_url(redis_url)
    seeded: list[tuple[str, str]] = []

    async def seed(user_id: str, day: str) -> int:
        seeded.append((user_id, day))
        return 90

    limiter = RedisLimiter(redis, seed)
    try:
        assert await limiter.open_connection("heavy", "c1", TIGHT)

        async def started() -> bool:
            return bool(await redis.exists(f"chat:{{u:heavy}}:tokens:{utc_day()}"))

        await eventually(started, timeout=5)
        assert seeded == [("heavy", utc_day())]
        # The first send finds the counter: no second store read, and the store's 90 count.
        assert await limiter.check_send("heavy", TIGHT) is None
        assert seeded == [("heavy", utc_day())]
        await limiter.add_tokens("heavy", 15)
        refused = await limiter.check_send("heavy", TIGHT)
        assert refused is not None and refused.code is ErrorCode.QUOTA_EXCEEDED
        # A second connection the same day reads nothing more from the store.
        assert await limiter.open_connection("heavy", "c2", TIGHT)
        assert seeded == [("heavy", utc_day())]
    finally:
        await redis.aclose()


def test_tier_limits_parse_and_name_their_errors() -> None:
    limits = TierLimits.parse("messages_per_minute=5,connections=2,daily_tokens=9", "X")
    assert limits == TierLimits(5, 2, 9)
    for bad, words in [
        ("messages_per_minute=5,connections=2", "missing daily_tokens"),
        ("speed=5,connections=2,daily_tokens=9", "unknown limit 'speed'"),
        ("messages_per_minute=x,connections=2,daily_tokens=9", "must be an integer"),
        ("messages_per_minute=0,connections=2,daily_tokens=9", "positive"),
    ]:
        with pytest.raises(ValueError, match=words):
            TierLimits.parse(bad, "CHAT_LIMITS_FREE")


# -- through the socket ------------------------------------------------------------------

LIMITS = "messages_per_minute=3,connections=2,daily_tokens=1000000"


@pytest.fixture(params=["memory", "redis", "redis-cluster"])
def services(request: pytest.FixtureRequest) -> dict[str, str]:
    """Where the limits and the window live: in process; one Redis, where the send check is
    the append's gate (one round trip); a cluster, where the limiter checks first."""
    if request.param == "memory":
        return {}
    if request.param == "redis":
        return {"redis_url": request.getfixturevalue("redis_url")}
    return {"redis_url": request.getfixturevalue("redis_cluster_url"), "redis_cluster": "yes"}


async def test_sends_past_the_rate_are_refused_with_a_retry_time(
    make_harness: MakeHarness, services: dict[str, str]
) -> None:
    harness = await make_harness(limits_free=LIMITS, **services)
    conv = await harness.conversation("alice")
    alice = await harness.connect("alice")
    for i in range(3):
        await alice.send(conv, f"m{i}")
    with pytest.raises(ChatError) as info:
        await alice.send(conv, "one too many")
    assert info.value.code == ErrorCode.RATE_LIMITED.value
    assert info.value.frame.retry_after_ms is not None and info.value.frame.retry_after_ms > 0
    assert [m.text for m in (await alice.history(conv)).messages if m.role == "user"] == [
        "m0",
        "m1",
        "m2",
    ]
    async with harness.http.get(harness.base_url + "/metrics") as resp:
        body = await resp.text()
    assert 'chat_rate_limited_total{code="rate_limited"} 1.0' in body


async def test_a_resend_past_the_rate_gets_its_duplicate_ack(
    make_harness: MakeHarness, services: dict[str, str]
) -> None:
    harness = await make_harness(limits_free=LIMITS, **services)
    conv = await harness.conversation("alice")
    alice = await harness.connect("alice")
    acks = [await alice.send(conv, f"m{i}", client_msg_id=f"k{i}") for i in range(3)]
    with pytest.raises(ChatError) as info:
        await alice.send(conv, "new", client_msg_id="k3")
    assert info.value.code == ErrorCode.RATE_LIMITED.value
    # The ack of m1 was lost, say: the resend is answered, not refused, and stores nothing.
    again = await alice.send(conv, "m1", client_msg_id="k1")
    assert again.duplicate and (again.message_id, again.offset) == (
        acks[1].message_id,
        acks[1].offset,
    )
    assert [m.text for m in (await alice.history(conv)).messages if m.role == "user"] == [
        "m0",
        "m1",
        "m2",
    ]


async def test_a_third_connection_is_closed_4429(make_harness: MakeHarness) -> None:
    harness = await make_harness(limits_free=LIMITS)
    await harness.connect("alice")
    await harness.connect("alice")
    token = await harness.token("alice")
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(harness.ws_url, headers={"Authorization": f"Bearer {token}"})
        first = await ws.receive(timeout=5)
        assert '"code":"rate_limited"' in first.data
        assert (await ws.receive(timeout=5)).type == aiohttp.WSMsgType.CLOSE
        assert ws.close_code == CloseCode.TOO_MANY_CONNECTIONS
    other = await harness.connect("bob")  # others are unaffected
    assert other.hello is not None


async def test_a_closed_connection_frees_its_slot(make_harness: MakeHarness) -> None:
    harness = await make_harness(limits_free=LIMITS)  # two connections per user
    connections = harness.app[keys.STATE].connections
    for _ in range(5):  # one after another: never more than one open at a time
        client = await harness.connect("alice")
        await client.close()
        harness.clients.remove(client)
        await eventually(lambda: not connections)  # the server saw it go
    first = await harness.connect("alice")
    second = await harness.connect("alice")
    assert first.hello is not None and second.hello is not None


# Each tier's own bound on every limit, told apart: a pro user held to enterprise limits (or
# free ones) gets one more, or one fewer, of each than its own.
TIER_BOUND = {"free": 2, "pro": 3, "enterprise": 4}


def _tier_limits(n: int) -> str:
    # REST requests one above the creations: creating n conversations spends n requests, and
    # the next creation must meet the creation rate, not the request rate.
    return (
        f"messages_per_minute={n},connections={n},daily_tokens={1000 * n},"
        f"requests_per_minute={n + 1},conversations=1000,conversations_per_minute={n}"
    )


@pytest.mark.parametrize("tier", sorted(TIER_BOUND))
async def test_tiers_have_their_own_limits(make_harness: MakeHarness, tier: str) -> None:
    harness = await make_harness(
        **{f"limits_{name}": _tier_limits(n) for name, n in TIER_BOUND.items()}
    )
    n = TIER_BOUND[tier]
    conv = await harness.conversation("owner", members=["sender", "spender"])

    # Messages per minute: n go through, the next is refused.
    sender = await harness.connect("sender", tier=tier)
    for i in range(n):
        await sender.send(conv, f"m{i}")
    with pytest.raises(ChatError) as info:
        await sender.send(conv, "one too many")
    assert info.value.code == ErrorCode.RATE_LIMITED.value

    # Connections: n at once (the sender's is one of them), the next is closed 4429.
    for _ in range(n - 1):
        assert (await harness.connect("sender", tier=tier)).hello is not None
    token = await harness.token("sender", tier)
    headers = {"Authorization": f"Bearer {token}"}
    async with harness.http.ws_connect(harness.ws_url, headers=headers) as ws:
        assert '"code":"rate_limited"' in (await ws.receive(timeout=5)).data
        assert (await ws.receive(timeout=5)).type == aiohttp.WSMsgType.CLOSE
        assert ws.close_code == CloseCode.TOO_MANY_CONNECTIONS

    # REST requests per minute.
    reader = await harness.api("reader", tier)
    statuses = [(await reader.request("GET", "/api/conversations"))[0] for _ in range(n + 2)]
    assert statuses == [200] * (n + 1) + [429]

    # Conversations created per minute.
    creator = await harness.api("creator", tier)
    for _ in range(n):
        await creator.create_conversation()
    status, body = await creator.request("POST", "/api/conversations", json={"agent_id": "x"})
    assert status == 429 and "new conversations per minute" in body["error"]["message"]

    # Daily model tokens: one short of the quota may still send, the quota itself may not.
    limiter = harness.app[keys.LIMITER]
    spender = await harness.connect("spender", tier=tier)
    await limiter.add_tokens("spender", 1000 * n - 1)
    await spender.send(conv, "just under the quota")
    await limiter.add_tokens("spender", 1)
    with pytest.raises(ChatError) as info:
        await spender.send(conv, "at the quota")
    assert info.value.code == ErrorCode.QUOTA_EXCEEDED.value


async def test_an_exhausted_quota_stops_replies_before_any_model_call(
    make_harness: MakeHarness, services: dict[str, str]
) -> None:
    harness = await make_harness(
        limits_free="messages_per_minute=100,connections=5,daily_tokens=40", **services
    )
    conv = await harness.conversation("alice")
    alice = await harness.connect("alice")
    await alice.join(conv)
    ack = await alice.send(conv, "use up my tokens " + "word " * 30)
    reply = await alice.reply(ack.message_id)
    assert reply.end is not None
    used = reply.end.usage.input_tokens + reply.end.usage.output_tokens
    assert used >= 40
    provider = harness.app[keys.GENERATION].provider
    await eventually(lambda: provider.active == 0)
    limiter = harness.app[keys.LIMITER]
    tight = TierLimits(100, 5, 40)

    async def counted() -> bool:  # the reply's usage reached the (shared) counter
        refused = await limiter.check_send("alice", tight)
        return refused is not None and refused.code is ErrorCode.QUOTA_EXCEEDED

    await eventually(counted)
    with pytest.raises(ChatError) as info:
        await alice.send(conv, "one more question")
    assert info.value.code == ErrorCode.QUOTA_EXCEEDED.value
    reset = info.value.frame.retry_after_ms
    assert reset is not None and abs(reset - ms_until_next_utc_day()) < 60_000
    await alice.ping("flush")
    assert not any(isinstance(f, GenStart) for f in alice.pending())
    assert len((await alice.history(conv)).messages) == 2  # the refused one was not stored


async def test_refusals_reach_the_client_as_error_frames(harness: Harness) -> None:
    # Sanity: the default harness (unlimited) never refuses a burst.
    conv = await harness.conversation("alice")
    alice = await harness.connect("alice")
    for i in range(30):
        await alice.send(conv, f"burst {i}")
    await alice.ping("flush")
    assert not any(isinstance(f, ErrorFrame) for f in alice.pending())


async def test_a_frame_flood_is_refused_then_closed(make_harness: MakeHarness) -> None:
    harness = await make_harness(frames_per_second=5, bad_frame_limit=10)
    alice = await harness.connect("alice")
    for i in range(40):  # far past 5 a second with a burst of 10
        await alice.send_raw('{"type":"ping","ts":%d}' % i)
    refused = 0
    with pytest.raises(Closed):
        while True:
            frame = await alice.next_frame(timeout=5)
            if isinstance(frame, ErrorFrame):
                assert frame.code == ErrorCode.RATE_LIMITED.value and frame.retry_after_ms
                refused += 1
    assert refused > 10 and alice.close_code == CloseCode.POLICY_VIOLATION
    bob = await harness.connect("bob")  # others are served
    assert (await bob.ping(1)).ts == 1


async def test_the_memory_limiter_keeps_at_most_its_users() -> None:
    async def seed(user_id: str, day: str) -> int:
        return 0

    limiter = MemoryLimiter(seed, max_users=3)
    for i in range(10):
        assert await limiter.check_send(f"u{i}", TIGHT) is None
        assert await limiter.take(f"u{i}", "rest", 10) is None
    fill = limiter.fill()
    assert fill == {"limiter_buckets": (3, 3), "limiter_day_counts": (3, 3)}
    # The most recent are the ones kept: u9's bucket has one message fewer than a fresh one.
    assert [await limiter.check_send("u9", TIGHT) for _ in range(2)] == [None, None]
    assert await limiter.check_send("u9", TIGHT) is not None
