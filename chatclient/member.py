"""A conversation member that behaves like the browser client under faults.

It reconnects (round robin over instances, backoff, honouring ``reconnect.after_ms``),
rejoins with ``since`` = the end of the contiguous prefix it holds, resends unacked messages
with the same ``client_msg_id``, and keeps a ledger: what was acked, what it saw, whether
it recovered or was told to reload, duplicates within one connection, replies started and
ended. Fault tests and ``bench/chaos.py`` judge a run by these ledgers.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from protocol import (
    Ack,
    Delta,
    ErrorFrame,
    GenEnd,
    GenStart,
    Joined,
    MessageEvent,
    Reconnect,
    Send,
    Since,
)
from protocol.backoff import Backoff

from .client import ChatClient, ChatError, Closed, cancel_and_wait

# Between failed connects: 50-100 ms at first, doubling up to 2-4 s.
_RECONNECT = Backoff(initial_s=0.1, max_s=4.0)


@dataclass
class Ledger:
    """What one member saw; add them up for a run."""

    acked: dict[str, str] = field(default_factory=dict)  # message id -> client_msg_id
    sent: int = 0
    refused: dict[str, int] = field(default_factory=dict)  # error code -> count
    connects: int = 0
    reconnects: list[str] = field(default_factory=list)  # URLs that told it to reconnect
    recovered: int = 0  # rejoins that got exactly the missed messages
    reloads: int = 0  # rejoins told to reload (recovered: false)
    duplicates: int = 0  # an offset delivered twice on one connection
    bad_recoveries: list[str] = field(default_factory=list)
    replies_started: set[str] = field(default_factory=set)
    # generation -> when (wall clock) and where it was first seen: a trail for one never ended
    first_seen: dict[str, tuple[float, str]] = field(default_factory=dict)
    replies_ended: dict[str, str] = field(default_factory=dict)  # generation -> finish reason
    seen: set[int] = field(default_factory=set)
    reload_floor: int = 0  # offsets up to here were reloaded through history, not streamed

    def prefix(self) -> int:
        """The highest offset such that every offset after the reload floor up to it was seen."""
        offset = self.reload_floor
        while offset + 1 in self.seen:
            offset += 1
        return offset


class Member:
    def __init__(
        self,
        urls: Sequence[str],
        user: str,
        token: Callable[[str], str],
        conversation_id: str,
        *,
        send_every_s: float | None = 0.5,
        start_at: int = 0,
    ) -> None:
        self.urls = list(urls)
        self.user = user
        self._token = token
        self.conversation_id = conversation_id
        self.send_every_s = send_every_s
        self._next_url = start_at
        self.ledger = Ledger()
        self.epoch: str | None = None
        self._unacked: list[tuple[str, str]] = []  # (client_msg_id, text) to (re)send
        self._counter = 0
        self.client: ChatClient | None = None
        self.url: str | None = None  # where the current connection is (None between them)
        self.sending = True  # cleared at the end of a run: listen only, let replies end

    async def run(self, stop: asyncio.Event) -> None:
        attempt = 0  # failed connects in a row
        while not stop.is_set():
            url = self.urls[self._next_url % len(self.urls)]
            self._next_url += 1
            try:
                self.client = await ChatClient.connect(url, self._token(self.user), timeout=5)
            except (OSError, Closed, ChatError, TimeoutError):
                attempt += 1
                await asyncio.sleep(_RECONNECT.delay(attempt))
                continue
            attempt = 0
            self.ledger.connects += 1
            self.url = url
            try:
                delay_ms = await self._session(self.client, stop)
            finally:
                with contextlib.suppress(Exception):
                    await self.client.close()
                self.client = None
                self.url = None
            if delay_ms:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay_ms / 1000)

    async def settle(self, url: str) -> Joined:
        """One last rejoin with `since`: what a client holds at the end of a run."""
        client = await ChatClient.connect(url, self._token(self.user), timeout=10)
        try:
            since = Since(self.ledger.prefix(), self.epoch) if self.epoch else None
            joined = await client.join(self.conversation_id, since)
            self._take_joined(joined, since)
            return joined
        finally:
            await client.close()

    async def _session(self, client: ChatClient, stop: asyncio.Event) -> int:
        since = Since(self.ledger.prefix(), self.epoch) if self.epoch else None
        try:
            joined = await client.join(self.conversation_id, since)
        except (TimeoutError, Closed, ChatError):
            return 200
        self._take_joined(joined, since)
        sender = asyncio.create_task(self._send_loop(client, stop))
        delivered: set[int] = set()
        try:
            while not stop.is_set():
                try:
                    frame = await client.next_frame(timeout=1.0)
                except TimeoutError:
                    continue
                except Closed:
                    return 100
                if isinstance(frame, MessageEvent):
                    self._take_offset(frame.message.offset, delivered)
                elif isinstance(frame, GenEnd):
                    self.ledger.replies_ended[frame.generation_id] = frame.finish_reason
                    if frame.message is not None:
                        self._take_offset(frame.message.offset, delivered)
                elif isinstance(frame, GenStart | Delta):
                    self._started(frame.generation_id, "streamed")
                elif isinstance(frame, Reconnect):
                    self.ledger.reconnects.append(self.url or "")
                    return frame.after_ms
                elif isinstance(frame, Ack):
                    self._take_ack(frame)
                elif isinstance(frame, ErrorFrame):
                    self.ledger.refused[frame.code] = self.ledger.refused.get(frame.code, 0) + 1
            return 0
        finally:
            await cancel_and_wait(sender)

    def _take_joined(self, joined: Joined, since: Since | None) -> None:
        offsets = [m.offset for m in joined.messages]
        if since is not None and joined.recovered:
            expected = list(range(since.offset + 1, joined.offset + 1))
            if offsets != expected:
                self.ledger.bad_recoveries.append(
                    f"since {since.offset}: got {offsets[:5]}..., expected {expected[:5]}..."
                )
            self.ledger.recovered += 1
        else:
            if since is not None:
                self.ledger.reloads += 1  # told to reload: the page reloads its history
            self.ledger.reload_floor = max(self.ledger.reload_floor, joined.offset)
        self.epoch = joined.epoch
        self.ledger.seen.update(offsets)
        for message in joined.messages:
            # A reply that ended while we were away: its stored message names its generation.
            if message.role == "assistant" and message.client_msg_id and message.finish_reason:
                self.ledger.replies_ended.setdefault(message.client_msg_id, message.finish_reason)
        if joined.generation is not None:
            self._started(joined.generation.generation_id, "joined")

    def _started(self, generation_id: str, how: str) -> None:
        if generation_id not in self.ledger.replies_started:
            self.ledger.replies_started.add(generation_id)
            self.ledger.first_seen[generation_id] = (time.time(), f"{how} on {self.url}")

    def _take_offset(self, offset: int, delivered: set[int]) -> None:
        if offset in delivered:
            self.ledger.duplicates += 1
        delivered.add(offset)
        self.ledger.seen.add(offset)

    def _take_ack(self, ack: Ack) -> None:
        self.ledger.acked[ack.message_id] = ack.client_msg_id
        self._unacked = [(c, t) for c, t in self._unacked if c != ack.client_msg_id]

    async def _send_loop(self, client: ChatClient, stop: asyncio.Event) -> None:
        if self.send_every_s is None:
            return
        while not stop.is_set():
            await asyncio.sleep(self.send_every_s * (0.5 + random.random()))
            if not self.sending and not self._unacked:
                continue
            if not self._unacked:
                self._counter += 1
                cmid = f"{self.user}-{self._counter}-{uuid.uuid4().hex[:6]}"
                self._unacked.append((cmid, f"{self.user} says {self._counter}"))
                self.ledger.sent += 1
            # Unacked messages go again with the same id: a duplicate ack, never a copy.
            for cmid, text in list(self._unacked):
                await client.send_frame(Send(self.conversation_id, cmid, text, ref=cmid))
