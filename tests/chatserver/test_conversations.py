"""ConversationService.create checks its input against protocol.Limits (one set of bounds);
its cached conversations ride out a store outage."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from chatserver import conversation_cache
from chatserver.agents import AgentCatalog
from chatserver.auth import Principal
from chatserver.conversations import ConversationService
from chatserver.errors import ServiceError
from protocol import Limits
from storage import MemoryOutbox, MemoryWindow, SqliteStore, StoreUnavailable

TIGHT = Limits(max_members=3, max_title_chars=5, max_id_chars=4)


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[ConversationService]:
    store = SqliteStore(str(tmp_path / "chat.db"))
    await store.start()
    yield ConversationService(
        store, MemoryWindow(), MemoryOutbox(), AgentCatalog.load(None), limits=TIGHT
    )
    await store.close()


async def test_the_limits_bound_title_members_and_ids(service: ConversationService) -> None:
    agent = next(iter(service.agents)).id
    owner = Principal("own")
    made = await service.create(owner, agent, "five!", ["u2", "u3"])
    assert made.members == ("own", "u2", "u3")
    for title, members, error in [
        ("sixsix", [], "title longer than 5 characters"),
        ("t", ["u2", "u3", "u4"], "more than 3 members"),
        ("t", ["long1"], "member ids must be 1..4 characters"),
    ]:
        with pytest.raises(ServiceError, match=error):
            await service.create(owner, agent, title, members)


async def test_a_cached_conversation_holds_while_the_store_is_down(
    service: ConversationService, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent = next(iter(service.agents)).id
    made = await service.create(Principal("own"), agent, "t", ["u2"])
    assert (await service.require_member(made.id, "u2")).id == made.id  # read and cached

    async def down(conversation_id: str) -> None:
        raise StoreUnavailable("Postgres unavailable")

    monkeypatch.setattr(service.store, "get_conversation", down)
    monkeypatch.setattr(conversation_cache, "CACHE_S", 0.0)  # aged out: the store is asked first
    # The members as last read hold through the outage...
    assert (await service.require_member(made.id, "u2")).members == ("own", "u2")
    # ... and what was never read still needs the store.
    with pytest.raises(StoreUnavailable):
        await service.require_member("never-read", "u2")


async def test_the_conversation_cache_keeps_at_most_its_size(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "cache.db"))
    await store.start()
    try:
        service = ConversationService(
            store, MemoryWindow(), MemoryOutbox(), AgentCatalog.load(None), cache_size=2
        )
        agent = next(iter(service.agents)).id
        made = [await service.create(Principal("own"), agent, "t", []) for _ in range(4)]
        assert service.fill() == {"conversation_cache": (2, 2)}
        for conversation in made:  # the ones dropped are read from the store again
            assert await service.get(conversation.id) == conversation
        assert service.fill() == {"conversation_cache": (2, 2)}
    finally:
        await store.close()
