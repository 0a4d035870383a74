"""What an instance tells of its memory: the admin routes, the bounded structures' gauges,
allocation sites, and that replies and connections leave no cyclic garbage behind."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from chatclient.client import ChatApi
from chatserver import keys
from chatserver.auth import Authenticator
from chatserver.ops.observe import Sampler
from tests.chatserver.conftest import Harness, MakeHarness

SECRET = "memory-test-secret-0123456789abcdef"
EMBEDDED = {
    "idempotency_keys",
    "window_conversations",
    "window_bytes",
    "window_tombstones",
    "outbox_entries",
    "conversation_cache",
    "limiter_buckets",
    "limiter_day_counts",
    "ended_replies",
    "replies_held",
    "metric_children",
    "local_model_counted_chars",
}
# Only in process: the window, outbox and limiter are in Redis there; the store's authors
# are Postgres's.
PRODUCTION = {
    "context_cache_bytes",
    "conversation_cache",
    "ended_replies",
    "replies_held",
    "metric_children",
    "local_model_counted_chars",
    "recent_authors",
    "redis_connections",
}


def admin(harness: Harness) -> ChatApi:
    return ChatApi(harness.base_url, Authenticator(SECRET).issue("ops", role="admin"), harness.http)


async def test_the_memory_route_reports_the_heap_and_every_bound(
    make_harness: MakeHarness,
) -> None:
    harness = await make_harness(jwt_secret=SECRET, idempotency_keys=1234)
    status, body = await admin(harness).request("GET", "/api/admin/memory")
    assert status == 200
    assert body["rss_bytes"] > 0 and body["allocated_blocks"] > 0
    assert len(body["gc"]["collections"]) == 3
    assert body["tracemalloc"] is None  # off unless CHAT_TRACEMALLOC_FRAMES is set
    assert set(body["bounded"]) == EMBEDDED
    assert body["bounded"]["idempotency_keys"] == {"entries": 0, "bound": 1234}
    user = ChatApi(harness.base_url, Authenticator(SECRET).issue("eve"), harness.http)
    for method, path in (
        ("GET", "/api/admin/memory"),
        ("GET", "/api/admin/memory/sites"),
        ("POST", "/api/admin/memory/sites"),
        ("POST", "/api/admin/memory/collect"),
    ):
        status, body = await user.request(method, path)
        assert (status, body["error"]["code"]) == (403, "forbidden"), path


async def test_production_reports_its_in_process_bounds(
    make_harness: MakeHarness, redis_url: str, postgres_dsn: str
) -> None:
    harness = await make_harness(
        jwt_secret=SECRET, redis_url=redis_url, database_url=postgres_dsn, migrate="yes"
    )
    _, body = await admin(harness).request("GET", "/api/admin/memory")
    assert set(body["bounded"]) == PRODUCTION


async def test_the_bounds_are_gauges(make_harness: MakeHarness) -> None:
    harness = await make_harness(ended_replies=77)
    conv = await harness.conversation("alice")
    alice = await harness.connect("alice")
    await alice.join(conv)
    for i in range(3):
        ack = await alice.send(conv, f"question {i}")
        await alice.reply(ack.message_id)
    await Sampler(harness.app).sample()
    registry = harness.app[keys.METRICS].registry

    def gauge(name: str, structure: str) -> float | None:
        return registry.get_sample_value(name, {"structure": structure})

    assert gauge("chat_bounded_limit", "ended_replies") == 77
    assert gauge("chat_bounded_size", "ended_replies") == 3
    assert gauge("chat_bounded_size", "idempotency_keys") == 6  # 3 questions, 3 answers
    assert gauge("chat_bounded_size", "window_conversations") == 1
    assert (gauge("chat_bounded_size", "window_bytes") or 0) > 6 * 768


async def test_allocation_sites_need_tracing(make_harness: MakeHarness) -> None:
    harness = await make_harness(jwt_secret=SECRET)
    status, body = await admin(harness).request("GET", "/api/admin/memory/sites")
    assert (status, body["error"]["code"]) == (400, "bad_request")
    assert "CHAT_TRACEMALLOC_FRAMES" in body["error"]["message"]


async def test_allocation_sites_show_what_grew_since_the_mark(make_harness: MakeHarness) -> None:
    harness = await make_harness(jwt_secret=SECRET, tracemalloc_frames=2)
    api = admin(harness)
    status, marked = await api.request("POST", "/api/admin/memory/sites")
    assert status == 200 and marked["sites"] > 0
    kept = [bytearray(1000) for _ in range(3000)]  # ~3 MB that stays: the top site
    status, grown = await api.request("GET", "/api/admin/memory/sites?top=3")
    assert status == 200 and grown["since_mark"]
    top = grown["sites"][0]
    assert top["size_diff"] >= 3000 * 1000 and top["count_diff"] >= 3000
    assert top["traceback"][0].startswith("tests/chatserver/ops/test_memory.py:")
    assert len(grown["sites"]) <= 3
    status, body = await api.request("GET", "/api/admin/memory")
    assert body["tracemalloc"]["frames"] == 2 and body["tracemalloc"]["traced_bytes"] > 3e6
    del kept


class _Loop:
    """An object in a reference cycle with itself."""

    def __init__(self) -> None:
        self.me = self


@contextmanager
def collector_off() -> Iterator[None]:
    """No automatic collection: what is garbage stays there until we look."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


async def test_a_full_collection_says_what_the_cyclic_garbage_was(
    make_harness: MakeHarness,
) -> None:
    harness = await make_harness(jwt_secret=SECRET)
    with collector_off():
        for _ in range(50):
            _Loop()
        status, body = await admin(harness).request("POST", "/api/admin/memory/collect?top=100")
    assert status == 200 and body["collected"] >= 50
    kinds = {k["type"]: k["count"] for k in body["garbage_types"]}
    assert kinds[f"{__name__}._Loop"] == 50
    assert gc.garbage == []  # let go after counting


def server_garbage() -> dict[str, int]:
    """Types of this server's own objects found in cyclic garbage now (the clients of the
    test share the process: their objects are left out)."""
    flags = gc.get_debug()
    gc.set_debug(flags | gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        found: dict[str, int] = {}
        for obj in gc.garbage:
            kind = type(obj)
            name = f"{kind.__module__}.{kind.__qualname__}"
            if name.startswith(("chatserver.", "storage.", "aiohttp.web")):
                found[name] = found.get(name, 0) + 1
        return found
    finally:
        gc.garbage.clear()
        gc.set_debug(flags)
        gc.collect()


async def test_replies_leave_no_cyclic_garbage(harness: Harness) -> None:
    """Every reply's objects are freed by reference counting: none waits for a full
    collection, which the server runs rarely (cli.py)."""
    conv = await harness.conversation("alice")
    alice = await harness.connect("alice")
    await alice.join(conv)
    ack = await alice.send(conv, "a first one, so that the app has warmed up")
    await alice.reply(ack.message_id)
    ended: list[Any] = []
    with collector_off():
        for i in range(5):
            ack = await alice.send(conv, f"question number {i}")
            ended.append(await alice.reply(ack.message_id))
        found = server_garbage()
    assert all(r.end is not None and r.end.finish_reason == "stop" for r in ended)
    assert found == {}


async def test_closed_connections_leave_no_cyclic_garbage(harness: Harness) -> None:
    conv = await harness.conversation("alice")
    with collector_off():
        for _ in range(5):
            client = await harness.connect("alice")
            await client.join(conv)
            await client.close()
            harness.clients.remove(client)
        state = harness.app[keys.STATE]
        assert not state.connections and not state.users
        found = server_garbage()
    assert found == {}
