"""One authenticated WebSocket connection: who it is, what it joined, what it is sent."""

from __future__ import annotations

import time
from typing import Any

from protocol import Encoding, ServerFrame

from ..auth import Principal
from .events import Event, framed
from .outbound import Outbound


class Subscription:
    """A joined conversation, with the floors that keep a (re)join free of duplicates.

    While ``held`` is a list the join is still reading the window: live events wait
    there and are replayed through the floors once ``joined`` is queued.
    """

    __slots__ = ("floor_offset", "gen_floors", "held", "presence")

    def __init__(self) -> None:
        self.floor_offset = 0
        self.gen_floors: dict[str, int] | None = None
        self.held: list[Event] | None = []
        self.presence: tuple[str, ...] | None = None  # the online list last sent


class Session:
    __slots__ = (
        "bad_frames",
        "bad_window_start",
        "encoding",
        "frame_allowance",
        "frame_allowance_at",
        "held_limit",
        "id",
        "outbound",
        "principal",
        "subscriptions",
    )

    def __init__(
        self,
        session_id: str,
        principal: Principal,
        encoding: Encoding,
        outbound: Outbound,
        held_limit: int = 1000,
    ) -> None:
        self.id = session_id
        self.principal = principal
        self.encoding = encoding
        self.outbound = outbound
        self.subscriptions: dict[str, Subscription] = {}
        self.bad_frames = 0
        self.bad_window_start = 0.0  # set by the first bad frame (a shared constant until then)
        self.frame_allowance = -1.0  # full on first use
        self.frame_allowance_at = 0.0
        self.held_limit = held_limit

    @property
    def user_id(self) -> str:
        return self.principal.user_id

    def send(self, frame: ServerFrame) -> bool:
        return self.send_dict(frame.to_dict())

    def send_dict(self, frame: dict[str, Any]) -> bool:
        return self.outbound.push(framed(frame, self.encoding))

    def deliver(self, event: Event) -> None:
        """Hand one fan-out event to this connection, applying the join floors."""
        sub = self.subscriptions.get(event.conversation_id)
        if sub is None:
            return
        if sub.held is not None:
            if len(sub.held) >= self.held_limit:
                self.outbound.overflow()
                return
            sub.held.append(event)
            return
        self._deliver(sub, event)

    def _deliver(self, sub: Subscription, event: Event) -> None:
        if event.offset and event.offset <= sub.floor_offset:
            return
        if event.generation_id is not None and sub.gen_floors:
            floor = sub.gen_floors.get(event.generation_id)
            if floor is not None and event.seq <= floor:
                return
        if event.exclude_user is not None and event.exclude_user == self.principal.user_id:
            return
        self.outbound.push(event.framed(self.encoding.binary))

    def release(self, conversation_id: str, floor_offset: int, gen: tuple[str, int] | None) -> None:
        """The ``joined`` frame is queued: set the floors and replay the held events."""
        sub = self.subscriptions.get(conversation_id)
        if sub is None:
            return
        sub.floor_offset = floor_offset
        if gen is not None:
            sub.gen_floors = {gen[0]: gen[1]}
        held = sub.held or []
        sub.held = None
        for event in held:
            self._deliver(sub, event)

    def take_frame(self, per_second: int) -> int | None:
        """A token bucket of client frames (burst: two seconds' worth); ms to wait, or None."""
        now = time.monotonic()
        burst = 2.0 * per_second
        if self.frame_allowance < 0:
            self.frame_allowance, self.frame_allowance_at = burst, now
        allowance = min(burst, self.frame_allowance + (now - self.frame_allowance_at) * per_second)
        self.frame_allowance_at = now
        if allowance >= 1:
            self.frame_allowance = allowance - 1
            return None
        self.frame_allowance = allowance
        return max(1, int((1 - allowance) / per_second * 1000))

    def note_bad_frame(self, limit: int, window_s: float = 60.0) -> bool:
        """Count a bad frame; True when the connection passed its allowance."""
        now = time.monotonic()
        if now - self.bad_window_start > window_s:
            self.bad_window_start = now
            self.bad_frames = 0
        self.bad_frames += 1
        return self.bad_frames > limit
