"""Fixtures that run each storage conformance suite against every implementation.

Adding an implementation (Redis, Postgres) means one entry in the matching factory dict: the
fixtures are parametrized over the dict's keys, so every conformance test then runs on it too.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

import pytest

from protocol import Message, timestamp_from_ms
from storage import MemoryOutbox, MemoryWindow, SqliteStore
from storage.outbox.base import Outbox
from storage.store.base import Store
from storage.window.base import HotWindow


class StoreMaker(Protocol):
    def __call__(self) -> Store: ...


# name -> (tmp_path -> a maker of stores that all open the SAME backing database)
STORE_FACTORIES: dict[str, Callable[[Path], StoreMaker]] = {
    "sqlite": lambda tmp: lambda: SqliteStore(str(tmp / "chat.db")),
}

# name -> (**options -> outbox). Options: max_entries.
OUTBOX_FACTORIES: dict[str, Callable[..., Outbox]] = {
    "memory": lambda *, max_entries=100_000: MemoryOutbox(max_entries=max_entries),
}


def _memory_window(
    *,
    size: int = 200,
    idempotency_ttl_s: float = 86400,
    max_conversations: int = 100_000,
    outbox_max_entries: int = 100_000,
) -> tuple[HotWindow, Outbox]:
    window = MemoryWindow(
        size=size, idempotency_ttl_s=idempotency_ttl_s, max_conversations=max_conversations
    )
    return window, MemoryOutbox(max_entries=outbox_max_entries)


# name -> (**options -> (window, the outbox it appends to)). A window and its outbox come as a
# pair because a production window appends to its own outbox in the same atomic step.
# Options: size, idempotency_ttl_s, max_conversations, outbox_max_entries.
WINDOW_FACTORIES: dict[str, Callable[..., tuple[HotWindow, Outbox]]] = {
    "memory": _memory_window,
}


@pytest.fixture(params=sorted(STORE_FACTORIES))
def store_maker(request: pytest.FixtureRequest, tmp_path: Path) -> StoreMaker:
    """Makes unstarted stores on one backing database (for close/reopen tests)."""
    return STORE_FACTORIES[request.param](tmp_path)


@pytest.fixture
async def store(store_maker: StoreMaker) -> AsyncIterator[Store]:
    s = store_maker()
    await s.start()
    yield s
    await s.close()


MakeOutbox = Callable[..., Awaitable[Outbox]]
MakeWindow = Callable[..., Awaitable[tuple[HotWindow, Outbox]]]


@pytest.fixture(params=sorted(OUTBOX_FACTORIES))
async def make_outbox(request: pytest.FixtureRequest) -> AsyncIterator[MakeOutbox]:
    made: list[Outbox] = []

    async def make(**options: Any) -> Outbox:
        box = OUTBOX_FACTORIES[request.param](**options)
        await box.start()
        made.append(box)
        return box

    yield make
    for box in made:
        await box.close()


@pytest.fixture
async def outbox(make_outbox: MakeOutbox) -> Outbox:
    return await make_outbox()


@pytest.fixture(params=sorted(WINDOW_FACTORIES))
async def make_window(request: pytest.FixtureRequest) -> AsyncIterator[MakeWindow]:
    made: list[tuple[HotWindow, Outbox]] = []

    async def make(**options: Any) -> tuple[HotWindow, Outbox]:
        pair = WINDOW_FACTORIES[request.param](**options)
        await pair[1].start()
        await pair[0].start()
        made.append(pair)
        return pair

    yield make
    for window, box in made:
        await window.close()
        await box.close()


@pytest.fixture
async def window_pair(make_window: MakeWindow) -> tuple[HotWindow, Outbox]:
    return await make_window()


@pytest.fixture
def window(window_pair: tuple[HotWindow, Outbox]) -> HotWindow:
    return window_pair[0]


class MessageFactory:
    """Builds stored-shape messages with contiguous offsets per conversation.

    User messages default to user ``u1``, assistant messages to agent ``a1``.
    """

    def __init__(self) -> None:
        self._offsets: dict[str, int] = {}
        self._ms = 1_700_000_000_000

    def __call__(self, conversation_id: str, *, role: str = "user", **fields: Any) -> Message:
        offset = fields.pop("offset", self._offsets.get(conversation_id, 0) + 1)
        self._offsets[conversation_id] = max(offset, self._offsets.get(conversation_id, 0))
        self._ms += 1
        if role == "user":
            fields.setdefault("user_id", "u1")
        elif role == "assistant":
            fields.setdefault("agent_id", "a1")
        fields.setdefault("text", f"message {offset}")
        fields.setdefault("created_at", timestamp_from_ms(self._ms))
        return Message(
            id=str(uuid.uuid4()),
            conversation_id=conversation_id,
            offset=offset,
            role=role,
            **fields,
        )


@pytest.fixture
def new_message() -> MessageFactory:
    return MessageFactory()
