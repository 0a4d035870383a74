"""A worker's sending: the paced or flat-out loop, each sender's window, the board it waits on.

``Worker`` (``worker.py``) is a ``Sending``: its receiving side releases a sender's window
(``release``) when the sender's message is done or refused, or its reply ended.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import TYPE_CHECKING

from .accounting import marker
from .config import LoadConfig
from .flow import DoneBoard

if TYPE_CHECKING:
    from .dialects import Dialect
    from .session import Client, Setup

# How often a worker looks at the board for the other workers' progress (flat out only): well
# under the time a delivery takes, for a thousand cheap wake-ups a second.
BOARD_POLL_S = 0.001


class Sending:
    """The sending half of a ``Worker`` (the attributes are the worker's)."""

    config: LoadConfig
    counts: Counter[str]
    dialect: Dialect
    errors: list[str]
    filler: str
    first_send_ns: int
    flight: set[int]
    running: bool
    senders: list[Client]
    setup: Setup
    track_flight: bool
    board: DoneBoard | None

    def release(self, client: Client) -> None:
        if client.inflight > 0:
            client.inflight -= 1
        client.turn += 1
        if self.running and self.config.rate == 0:
            self.try_send(client)

    def try_send(self, client: Client) -> bool:
        if client.busy or client.closed or not client.ready:
            return False
        if client.inflight >= self.config.window:
            return False
        board = self.board
        if board is not None and client.owed - board.least(client.index) >= self.config.window:
            return False  # a member in another worker is behind: wait for it (flow.py)
        turns = self.config.turns
        if turns and (client.conv_id is None or client.turn >= turns):
            if client.inflight:
                return False
            client.busy = True
            client.task = asyncio.get_running_loop().create_task(self.rotate_and_send(client))
            return True
        self.send(client)
        return True

    def send(self, client: Client) -> None:
        client.seq += 1
        now = time.monotonic_ns()
        tag = marker(client.index, client.seq, now)
        frame = {
            "type": "send",
            "conversation_id": client.conv_id,
            "client_msg_id": tag,
            "text": f"~L{tag} {self.filler}",
            "ref": tag,
        }
        opcode, data = self.dialect.encode(frame)
        if not client.proto_send(opcode, data):
            self.counts["send_failed"] += 1
            return
        client.inflight += 1
        client.owed += 1
        self.counts["sent"] += 1
        if not self.first_send_ns:
            self.first_send_ns = now
        if self.track_flight:
            self.flight.add((client.index << 32) | client.seq)

    async def rotate_and_send(self, client: Client) -> None:
        """A new conversation (REST), joined, then the message: a product-shaped turn."""
        try:
            old = client.conv_id
            await self.setup.open_conversation(client)
            if old is not None:
                client.send_frame({"type": "leave", "conversation_id": old})
            client.turn = 0
            client.busy = False
            if self.running:
                self.send(client)
        except Exception as exc:
            client.busy = False
            self.counts["rotate_failed"] += 1
            if len(self.errors) < 10:
                self.errors.append(f"client {client.index}: new conversation: {exc!r}")

    async def pace(self, t_go_ns: int) -> None:
        """Send at the configured rate, spread round-robin over this worker's senders."""
        senders = self.senders
        if not senders:
            return
        total = self.config.total_senders
        rate = self.config.rate * len(senders) / total
        done = 0
        turn = 0
        while self.running:
            due = int((time.monotonic_ns() - t_go_ns) / 1e9 * rate) - done
            for _ in range(max(0, due)):
                for _ in range(len(senders)):
                    client = senders[turn]
                    turn = (turn + 1) % len(senders)
                    if self.try_send(client):
                        break
                else:
                    self.counts["skipped_window_full"] += 1
                done += 1
            await asyncio.sleep(0.004)

    async def follow_board(self) -> None:
        """Flat out: send again for senders that waited on another worker's members."""
        senders = self.senders
        window = self.config.window
        while self.running:
            await asyncio.sleep(BOARD_POLL_S)
            for client in senders:
                for _ in range(window):
                    if not self.running or not self.try_send(client):
                        break
                    self.counts["sent_after_other_workers"] += 1
