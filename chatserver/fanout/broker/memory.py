"""The embedded broker: one instance, so publishing is handing the event to the local hub."""

from __future__ import annotations

import time
from collections.abc import Sequence

from ..envelope import Control
from ..events import Event
from .base import Deliver, OnControl, deliver_subscribed


class MemoryBroker:
    name = "memory"

    def __init__(self, server_id: str = "local") -> None:
        self.server_id = server_id
        self.on_control: OnControl | None = None
        self._deliver: Deliver | None = None
        self._subscribed: set[str] = set()

    async def start(self, deliver: Deliver) -> None:
        self._deliver = deliver

    async def close(self) -> None:
        self._deliver = None
        self._subscribed.clear()

    async def subscribe(self, conversation_id: str) -> None:
        self._subscribed.add(conversation_id)

    async def unsubscribe(self, conversation_id: str) -> None:
        self._subscribed.discard(conversation_id)

    async def publish(self, event: Event) -> None:
        if self._deliver is None or event.conversation_id not in self._subscribed:
            return
        if not event.published_at:
            event.published_at = time.time()
        self._deliver(event)

    async def publish_many(self, events: Sequence[Event]) -> None:
        # Not stamped: delivered in this very call, their fan-out delay is nil by
        # construction, and timing each of a reply's deltas cost ~3% of the loop.
        self.deliver_local(events)

    def deliver_local(self, events: Sequence[Event]) -> None:
        deliver_subscribed(self._deliver, self._subscribed, events)

    async def send_control(self, server_id: str, message: Control) -> None:
        if server_id == self.server_id and self.on_control is not None:
            self.on_control(message)

    async def announce(self, conversation_id: str, message: Control) -> None:
        if conversation_id in self._subscribed and self.on_control is not None:
            self.on_control(message)

    def healthy(self) -> bool:
        return self._deliver is not None

    def subscribed(self) -> frozenset[str]:
        return frozenset(self._subscribed)
