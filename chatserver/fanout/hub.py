"""The local hub: which sessions of this instance joined which conversation."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Protocol

from protocol import Encoding, Left

from .broker.base import Broker
from .events import Event
from .session import Session, Subscription

# Ends remembered to drop a second announcement: far more than replies end within the
# seconds that separate the two announcements of one (CHAT_ENDED_REPLIES).
ENDED_KEPT = 10_000


class PresenceHooks(Protocol):
    """Told of every subscription that starts or ends (chatserver/presence/)."""

    def entered(self, session: Session, conversation_id: str) -> None: ...

    def exited(self, session: Session, conversation_id: str) -> None: ...


_NO_MEMBERS: Mapping[Session, Subscription] = {}


class _Room:
    __slots__ = ("members", "ready")

    def __init__(self) -> None:
        # Each local member's subscription to this conversation, so a delivery need not
        # look it up in the session (the same object as in ``session.subscriptions``).
        self.members: dict[Session, Subscription] = {}
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()


class LocalHub:
    def __init__(
        self,
        broker: Broker,
        on_fanout: Callable[[float], None] | None = None,
        on_member_removed: Callable[[str], None] | None = None,
        ended_kept: int = ENDED_KEPT,
    ) -> None:
        self._broker = broker
        self.ended_kept = ended_kept
        self._rooms: dict[str, _Room] = {}
        self._on_fanout = on_fanout
        self._on_member_removed = on_member_removed
        self._leaving: set[asyncio.Task[None]] = set()  # unsubscribes under way, kept alive
        self.sessions: set[Session] = set()
        self._ended: OrderedDict[str, None] = OrderedDict()  # generations whose end went out
        self.presence: PresenceHooks | None = None
        self.delivered = 0  # fan-out frames handed to joined connections (a metric's source)

    def add_session(self, session: Session) -> None:
        self.sessions.add(session)

    async def remove_session(self, session: Session) -> None:
        self.sessions.discard(session)
        for conversation_id in list(session.subscriptions):
            await self.leave(session, conversation_id)

    async def join(self, session: Session, conversation_id: str) -> Subscription:
        """Subscribe (broker first, so nothing published after this returns is missed)."""
        old = session.subscriptions.get(conversation_id)
        if old is not None:
            # A re-join restarts the floors: the new `joined` frame resets the client's view.
            old.held = []
            old.gen_floors = None
            old.presence = None
            return old
        sub = Subscription()
        session.subscriptions[conversation_id] = sub
        room = self._rooms.get(conversation_id)
        if room is None:
            room = self._rooms[conversation_id] = _Room()
            room.members[session] = sub
            try:
                await self._broker.subscribe(conversation_id)
            except BaseException as exc:
                room.ready.set_exception(exc)
                room.ready.exception()  # retrieved: later joiners re-raise their own
                self._rooms.pop(conversation_id, None)
                session.subscriptions.pop(conversation_id, None)
                raise
            room.ready.set_result(None)
        else:
            room.members[session] = sub
            try:
                await asyncio.shield(room.ready)
            except BaseException:
                room.members.pop(session, None)
                session.subscriptions.pop(conversation_id, None)
                raise
        if self.presence is not None:
            self.presence.entered(session, conversation_id)
        return sub

    async def leave(self, session: Session, conversation_id: str) -> bool:
        if session.subscriptions.pop(conversation_id, None) is None:
            return False
        if self.presence is not None:
            self.presence.exited(session, conversation_id)
        room = self._rooms.get(conversation_id)
        if room is None:
            return True
        room.members.pop(session, None)
        if not room.members and room.ready.done():
            del self._rooms[conversation_id]
            await self._broker.unsubscribe(conversation_id)
        return True

    def deliver(self, event: Event) -> None:
        if event.removed_user is not None:
            self._remove_member(event.conversation_id, event.removed_user)
            return
        if event.ends is not None:
            if event.ends in self._ended:
                return  # announced before: a client sees one end per reply
            self._ended[event.ends] = None
            if len(self._ended) > self.ended_kept:
                self._ended.popitem(last=False)
        room = self._rooms.get(event.conversation_id)
        if room is None:
            return
        self.delivered += len(room.members)
        # The fan-out hot path: per member one dict step and one push. Events that a
        # member's join state or a filter may drop (held while joining, below the join
        # floor, generation frames of a member with generation floors, typing) take the
        # session's general path.
        plain = event.exclude_user is None
        generation = event.generation_id is not None
        offset = event.offset
        msgpack = Encoding.MSGPACK
        text: bytes | None = None
        binary: bytes | None = None
        for session, sub in room.members.items():
            if (
                not plain
                or sub.held is not None
                or (offset and offset <= sub.floor_offset)
                or (generation and sub.gen_floors)
            ):
                session.deliver(event)
            elif session.encoding is msgpack:
                if binary is None:
                    binary = event.framed(True)
                session.outbound.push(binary)
            else:
                if text is None:
                    text = event.framed(False)
                session.outbound.push(text)
        if self._on_fanout is not None and event.published_at:
            self._on_fanout(time.time() - event.published_at)

    def _remove_member(self, conversation_id: str, user_id: str) -> None:
        if self._on_member_removed is not None:
            self._on_member_removed(conversation_id)
        room = self._rooms.get(conversation_id)
        if room is None:
            return
        for session in [s for s in room.members if s.user_id == user_id]:
            # Out of the room now, in this step: nothing published after the removal reaches it.
            session.subscriptions.pop(conversation_id, None)
            room.members.pop(session, None)
            session.send(Left(conversation_id))
            if self.presence is not None:
                self.presence.exited(session, conversation_id)
        if not room.members and room.ready.done():
            del self._rooms[conversation_id]
            task = asyncio.get_running_loop().create_task(self._broker.unsubscribe(conversation_id))
            self._leaving.add(task)
            task.add_done_callback(self._leaving.discard)

    def room(self, conversation_id: str) -> Mapping[Session, Subscription]:
        """This instance's members joined to the conversation, with their subscriptions."""
        room = self._rooms.get(conversation_id)
        return room.members if room is not None else _NO_MEMBERS

    def fill(self) -> Mapping[str, tuple[int, int]]:
        """Entries and bound, for the gauges (``chatserver.ops.memory``)."""
        return {"ended_replies": (len(self._ended), self.ended_kept)}

    def local_members(self, conversation_id: str) -> int:
        room = self._rooms.get(conversation_id)
        return len(room.members) if room else 0

    def conversations(self) -> int:
        return len(self._rooms)
