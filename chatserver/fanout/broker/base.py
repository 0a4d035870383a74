"""Fan-out between instances: publish a conversation's frames to every instance's hub."""

from __future__ import annotations

from collections.abc import Callable, Container, Sequence
from typing import Protocol

from ..envelope import Control
from ..events import Event

Deliver = Callable[[Event], None]
OnControl = Callable[[Control], None]


def deliver_subscribed(
    deliver: Deliver | None, subscribed: Container[str], events: Sequence[Event]
) -> None:
    """``deliver_local`` of every broker: the events of conversations this instance is
    subscribed to, in order (none before ``start`` or after ``close``)."""
    if deliver is None:
        return
    for event in events:
        if event.conversation_id in subscribed:
            deliver(event)


class BrokerUnavailable(Exception):
    """The broker cannot publish right now."""


class Broker(Protocol):
    name: str
    server_id: str
    on_control: OnControl | None  # set by the app: control messages addressed to us

    async def start(self, deliver: Deliver) -> None:
        """Begin handing received events to ``deliver`` (the local hub)."""

    async def close(self) -> None: ...

    async def subscribe(self, conversation_id: str) -> None:
        """Receive the conversation's events from now on (first local member joined), and
        be counted among its watchers (``others_watch`` of the other instances)."""

    async def unsubscribe(self, conversation_id: str) -> None:
        """Stop receiving them (last local member left) and leave its watchers."""

    async def publish(self, event: Event) -> None:
        """Send to every instance subscribed to ``event.conversation_id``, this one included."""

    async def publish_many(self, events: Sequence[Event]) -> None:
        """``publish`` each event, in order, in one step (a loop pass's reply deltas)."""

    def deliver_local(self, events: Sequence[Event]) -> None:
        """Hand events to this instance's members only: a reply no other instance watches."""

    async def send_control(self, server_id: str, message: Control) -> None:
        """Deliver ``message`` to the instance ``server_id`` (e.g. cancel a reply it owns)."""

    async def announce(self, conversation_id: str, message: Control) -> None:
        """A control message to every instance subscribed to the conversation, in order
        with its events (``watch_ack``)."""

    def healthy(self) -> bool: ...
