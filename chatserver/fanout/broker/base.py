"""Fan-out between instances: publish a conversation's frames to every instance's hub."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from ..events import Event

Deliver = Callable[[Event], None]
Control = Callable[[dict[str, Any]], None]


class BrokerUnavailable(Exception):
    """The broker cannot publish right now."""


class Broker(Protocol):
    name: str
    server_id: str
    on_control: Control | None  # set by the app: control messages addressed to us

    async def start(self, deliver: Deliver) -> None:
        """Begin handing received events to ``deliver`` (the local hub)."""

    async def close(self) -> None: ...

    async def subscribe(self, conversation_id: str) -> None:
        """Receive the conversation's events from now on (first local member joined)."""

    async def unsubscribe(self, conversation_id: str) -> None:
        """Stop receiving them (last local member left)."""

    async def publish(self, event: Event) -> None:
        """Send to every instance subscribed to ``event.conversation_id``, this one included."""

    async def publish_many(self, events: Sequence[Event]) -> None:
        """``publish`` each event, in order, in one step (a loop pass's reply deltas)."""

    async def send_control(self, server_id: str, message: dict[str, Any]) -> None:
        """Deliver ``message`` to the instance ``server_id`` (e.g. cancel a reply it owns)."""

    def healthy(self) -> bool: ...
