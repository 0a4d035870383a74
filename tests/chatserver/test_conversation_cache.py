"""The conversation cache: a conversation in use is read again in the background before it
expires, so no frame waits for the store; its trust bound holds all the same."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from chatserver import conversation_cache
from chatserver.conversation_cache import ConversationCache
from protocol import format_timestamp
from storage import SqliteStore, StoreUnavailable
from storage.records import Conversation

WAIT_S = 5.0
THREE = ("c1", "c2", "c3")


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    store = SqliteStore(str(tmp_path / "chat.db"))
    await store.start()
    yield store
    await store.close()


async def _conversation(store: SqliteStore, cid: str, members: tuple[str, ...]) -> Conversation:
    now = format_timestamp(datetime.now(UTC))
    for user in members:
        await store.ensure_user(user, "free", "user")
    made = Conversation(
        id=cid,
        agent_id="assistant",
        title="t",
        owner_id=members[0],
        members=members,
        created_at=now,
        updated_at=now,
    )
    await store.create_conversation(made)
    return made


Read = Callable[[list[str]], Awaitable[dict[str, Conversation]]]


class HeldReads:
    """The store's own reads, each held until let go: what a busy store looks like."""

    def __init__(self, read: Read) -> None:
        self._read = read
        self.go = asyncio.Event()
        self.entered = asyncio.Event()
        self.started = 0
        self.asked: list[list[str]] = []  # the ids of each read

    async def reached(self, reads: int) -> None:
        """At least ``reads`` reads have begun (within WAIT_S)."""
        async with asyncio.timeout(WAIT_S):
            while self.started < reads:
                self.entered.clear()
                await self.entered.wait()

    async def __call__(self, conversation_ids: list[str]) -> dict[str, Conversation]:
        self.started += 1
        self.asked.append(list(conversation_ids))
        self.entered.set()
        await self.go.wait()
        return await self._read(conversation_ids)


async def _cached_then_held(
    store: SqliteStore,
    monkeypatch: pytest.MonkeyPatch,
    constant: str,
    ids: tuple[str, ...] = ("c1",),
) -> tuple[ConversationCache, HeldReads]:
    """The conversations ``ids`` (own, u2) cached; ``constant`` (REFRESH_S or CACHE_S) 0;
    the store's reads (one conversation or several: it reads one as a list of one) held."""
    cache = ConversationCache(store, 10)
    for cid in ids:
        await _conversation(store, cid, ("own", "u2"))
        assert await cache.get(cid) is not None
    monkeypatch.setattr(conversation_cache, constant, 0.0)
    monkeypatch.setattr(conversation_cache, "REFRESH_GATHER_S", 0.0)
    held = HeldReads(store.get_conversations)
    monkeypatch.setattr(store, "get_conversations", held)
    return cache, held


async def test_an_entry_in_use_is_read_again_in_the_background(
    store: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache, held = await _cached_then_held(store, monkeypatch, "REFRESH_S")  # due at once
    await store.remove_member("c1", "u2")
    # The store is held, yet the use is answered at once, from the entry...
    got = await asyncio.wait_for(cache.get("c1"), WAIT_S)
    assert got is not None and got.members == ("own", "u2")
    await held.reached(1)
    assert held.asked == [["c1"]] and cache.refreshing == 1
    assert (await cache.get("c1")) == got  # one read in flight per entry, not one per use
    assert held.started == 1
    # ... and the read in the background brings the store's members in.
    held.go.set()
    await asyncio.wait_for(cache.settled(), WAIT_S)
    monkeypatch.setattr(conversation_cache, "REFRESH_S", 60.0)
    got = await cache.get("c1")
    assert got is not None and got.members == ("own",)
    assert held.started == 1


async def test_a_read_in_flight_does_not_bring_back_a_forgotten_entry(
    store: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache, held = await _cached_then_held(store, monkeypatch, "REFRESH_S")
    await cache.get("c1")  # starts the read in the background
    cache.forget("c1")  # the members changed elsewhere meanwhile
    held.go.set()
    await asyncio.wait_for(cache.settled(), WAIT_S)
    assert len(cache) == 0  # the next use reads the store, not what the older read found


async def test_an_expired_entry_waits_for_the_store(
    store: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The trust bound holds: past CACHE_S the use waits for the store's answer."""
    cache, held = await _cached_then_held(store, monkeypatch, "CACHE_S")
    await store.remove_member("c1", "u2")
    use = asyncio.create_task(cache.get("c1"))
    await asyncio.wait_for(held.entered.wait(), WAIT_S)
    assert not use.done()
    held.go.set()
    got = await asyncio.wait_for(use, WAIT_S)
    assert got is not None and got.members == ("own",)


async def test_a_refresh_in_an_outage_keeps_the_entry(
    store: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    made = await _conversation(store, "c1", ("own", "u2"))
    cache = ConversationCache(store, 10)
    await cache.get("c1")
    monkeypatch.setattr(conversation_cache, "REFRESH_S", 0.0)

    async def down(conversation_ids: list[str]) -> None:
        raise StoreUnavailable("the store is down")

    monkeypatch.setattr(store, "get_conversations", down)
    assert await cache.get("c1") == made
    await asyncio.wait_for(cache.settled(), WAIT_S)
    assert await cache.get("c1") == made


async def test_entries_due_together_are_read_again_in_one_read(
    store: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache, held = await _cached_then_held(store, monkeypatch, "REFRESH_S", THREE)
    await store.remove_member("c2", "u2")
    for cid in THREE:
        assert await cache.get(cid) is not None  # each use answered from its entry
    await held.reached(1)
    assert held.asked == [["c1", "c2", "c3"]] and cache.refreshing == 3
    held.go.set()
    await asyncio.wait_for(cache.settled(), WAIT_S)
    assert held.started == 1 and cache.refreshing == 0
    monkeypatch.setattr(conversation_cache, "REFRESH_S", 60.0)
    got = await cache.get("c2")
    assert got is not None and got.members == ("own",)  # what the one read found
    assert held.started == 1


async def test_reads_in_the_background_are_bounded(
    store: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(conversation_cache, "MAX_REFRESHING", 2)
    cache, held = await _cached_then_held(store, monkeypatch, "REFRESH_S", THREE)
    for cid in THREE:
        assert await cache.get(cid) is not None
    await held.reached(1)
    assert cache.refreshing == 2 and held.asked == [["c1", "c2"]]
    await cache.close()  # cancels what is in flight
    assert cache.refreshing == 0
