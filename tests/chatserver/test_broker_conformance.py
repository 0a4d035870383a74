"""One conformance suite for every broker (Redis joins with its issue)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from chatserver.broker.base import Broker
from chatserver.broker.memory import MemoryBroker
from chatserver.events import Event


@pytest.fixture(params=["memory"])
async def broker(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Broker, list[Event]]]:
    received: list[Event] = []
    made = MemoryBroker()
    await made.start(received.append)
    yield made, received
    await made.close()


def _typing(conv: str, n: int) -> Event:
    return Event(conv, {"type": "typing", "conversation_id": conv, "user_id": f"u{n}"})


async def test_subscribed_conversations_are_delivered_in_order(
    broker: tuple[Broker, list[Event]],
) -> None:
    made, received = broker
    await made.subscribe("c1")
    for n in range(5):
        await made.publish(_typing("c1", n))
    assert [e.frame["user_id"] for e in received] == [f"u{n}" for n in range(5)]
    assert all(e.published_at > 0 for e in received)
    assert made.healthy()


async def test_unsubscribed_conversations_are_not(broker: tuple[Broker, list[Event]]) -> None:
    made, received = broker
    await made.subscribe("c1")
    await made.publish(_typing("c2", 1))
    await made.unsubscribe("c1")
    await made.publish(_typing("c1", 2))
    assert received == []


async def test_own_publications_arrive_once(broker: tuple[Broker, list[Event]]) -> None:
    made, received = broker
    await made.subscribe("c1")
    await made.subscribe("c1")
    await made.publish(_typing("c1", 1))
    assert len(received) == 1
