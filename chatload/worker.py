"""One load-test worker: its share of the clients, their traffic and their accounting.

The process around it is ``workerproc`` (``python -m chatload.workerproc``).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import Counter
from typing import Any

from .accounting import Tally, unmark
from .config import LoadConfig, host_port, http_base
from .dialects import Frame, dialect
from .flow import DoneBoard
from .procstat import own_cpu_seconds
from .receive import Deliveries
from .sending import Sending
from .session import Client, Setup
from .stats import HISTOGRAMS, Histogram


class Worker(Sending):
    def __init__(
        self, config: LoadConfig, index: int, emit: Any = None, board: DoneBoard | None = None
    ) -> None:
        self.config = config
        self.board = board  # flat-out chat over several workers: the windows they share
        self.index = index
        self.emit = emit or _emit
        self.dialect = dialect(config.dialect, config.encoding == "msgpack")
        self.prefixes = self.dialect.message_prefixes
        self.hist = {name: Histogram() for name in HISTOGRAMS}
        self.members = config.members
        self.tally = Tally()
        self.hostports = [host_port(url) for url in config.urls]
        self.bases = [http_base(url) for url in config.urls]
        self.clients: list[Client] = []
        self.by_index: dict[int, Client] = {}
        self.senders: list[Client] = []
        self.local_members: Counter[int] = Counter()
        self.acked: Counter[int] = Counter()
        self.replies_ended: Counter[int] = Counter()
        self.flight: set[int] = set()  # keys of this worker's messages not yet all delivered
        self.track_flight = config.mode == "chat"
        self.counts: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()
        self.close_codes: Counter[str] = Counter()
        self.finish: Counter[str] = Counter()
        self.errors: list[str] = []
        self.running = False
        self.shutting_down = False
        self.first_send_ns = 0
        self.last_delivery_ns = 0
        self.filler = _filler(config.text_bytes)
        self.cpu_at_go = 0.0
        self.expected: dict[int, int] = {}  # acked messages per conversation (all workers)
        self.deliveries = Deliveries(
            self.tally,
            self.hist["delivery"],
            config.members,
            self.local_members,
            self.prefixes,
            self.on_done,
        )
        self.setup = Setup(self)
        for i in range(index, config.clients, config.procs):
            client = Client(self, i)
            self.clients.append(client)
            self.by_index[i] = client
            if client.sender:
                self.senders.append(client)

    # -- receiving: the hot path -----------------------------------------------------------

    def on_payload(self, client: Client, payload: bytes, opcode: int, now: int) -> None:
        if payload.startswith(self.prefixes):
            self.on_message(client, payload, now)
        else:
            self.on_other(client, payload, now)

    def on_message(self, client: Client, payload: bytes, now: int) -> None:
        """One fan-out delivery by the general path (``receive`` counts most in its loop)."""
        start = payload.find(b"~L")
        if start < 0 or not self.deliveries.count(
            client.receiver, payload[start + 2 : start + 34], now
        ):
            self.counts["foreign_messages"] += 1

    def on_done(self, key: int) -> None:
        """Every local member has the message ``key``: its sender's window opens."""
        if self.board is not None:
            self.board.done(key >> 32)
        if key in self.flight:
            self.flight.discard(key)
            self.release(self.by_index[key >> 32])

    def on_other(self, client: Client, payload: bytes, now: int) -> None:
        try:
            frame = self.dialect.decode(payload)
        except ValueError:
            self.counts["undecodable"] += 1
            return
        if isinstance(frame, str):  # a transport packet to answer (socketio)
            client.send_raw(frame)
            return
        if frame is None:
            return
        kind = frame.get("type")
        if kind == "delta":
            self.on_delta(client, frame, now)
        elif kind == "ack":
            self.on_ack(client, frame, now)
        elif kind == "gen_start":
            gid = str(frame.get("generation_id"))
            asked = client.asked.pop(str(frame.get("reply_to")), 0)
            client.gens[gid] = [asked, 0, 0]
            self.counts["gen_starts"] += 1
        elif kind == "gen_end":
            self.on_gen_end(client, frame)
        elif kind == "message":  # not recognised by prefix: same accounting, slower
            message = frame.get("message")
            if isinstance(message, dict):
                self.on_message(client, str(message.get("text", "")).encode(), now)
        elif kind == "error":
            self.on_error(client, frame)
        elif kind in ("hello", "joined", "left"):
            client.resolve(kind, frame)
        elif kind == "reconnect":
            self.counts["reconnect_frames"] += 1

    def on_ack(self, client: Client, frame: Frame, now: int) -> None:
        parsed = unmark(str(frame.get("ref") or frame.get("client_msg_id") or ""))
        if parsed is None:
            self.counts["acks_unmatched"] += 1
            return
        self.hist["ack"].record_us((now - parsed[2]) // 1000)
        self.acked[client.conv] += 1
        self.counts["acked"] += 1
        if frame.get("duplicate"):
            self.counts["ack_duplicates"] += 1
        if self.config.mode == "ai" and "message_id" in frame:
            client.asked[str(frame["message_id"])] = parsed[2]

    def on_error(self, client: Client, frame: Frame) -> None:
        code = str(frame.get("code"))
        parsed = unmark(str(frame.get("ref") or ""))
        if parsed is not None:  # a refused send
            self.rejected[code] += 1
            client.owed -= 1
            self.flight.discard((parsed[0] << 32) | parsed[1])
            self.release(client)
        elif not client.resolve("error", frame):
            self.counts["errors_unsolicited"] += 1
            if len(self.errors) < 10:
                self.errors.append(f"client {client.index}: {code}: {frame.get('message')}")

    def on_delta(self, client: Client, frame: Frame, now: int) -> None:
        gid = str(frame.get("generation_id"))
        seq = int(frame.get("seq", 0))
        gen = client.gens.get(gid)
        if gen is None:
            gen = client.gens[gid] = [0, 0, 0]
            self.counts["deltas_without_start"] += 1
        last = gen[1]
        if seq <= last:
            self.counts["deltas_duplicated"] += 1
            return
        self.counts["deltas"] += 1
        if seq == last + 1:
            if seq == 1:
                if gen[0]:
                    self.hist["ttft"].record_us((now - gen[0]) // 1000)
            else:
                self.hist["gap"].record_us((now - gen[2]) // 1000)
        else:
            self.counts["deltas_lost"] += seq - last - 1
        gen[1] = seq
        gen[2] = now
        self.last_delivery_ns = now

    def on_gen_end(self, client: Client, frame: Frame) -> None:
        gen = client.gens.pop(str(frame.get("generation_id")), None)
        self.replies_ended[client.conv] += 1
        self.finish[str(frame.get("finish_reason"))] += 1
        if gen is None:
            self.counts["gen_ends_without_start"] += 1
        elif gen[0]:  # this client asked: its reply is done
            self.release(client)

    def on_close(self, client: Client, code: int | None) -> None:
        client.closed = True
        if not self.shutting_down and client.ready:
            self.counts["disconnects"] += 1
            self.close_codes[str(code)] += 1

    # -- phases ----------------------------------------------------------------------------

    async def ramp(self, t0_ns: int) -> None:
        setup = self.setup
        gate = asyncio.Semaphore(self.config.connect_concurrency)
        tasks = []
        per_client = self.config.ramp_s / max(1, self.config.clients)
        for client in self.clients:
            delay = (t0_ns + int(client.index * per_client * 1e9) - time.monotonic_ns()) / 1e9
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(setup.connect(client, gate)))
        await asyncio.gather(*tasks)
        if self.board is not None:
            config = self.config
            per = config.senders_per_conversation
            self.board.watch(
                i
                for i in range(config.clients)
                if i % config.members < per and self.local_members.get(i // config.members)
            )

    async def run(self, t_go_ns: int) -> None:
        self.cpu_at_go = own_cpu_seconds()
        delay = (t_go_ns - time.monotonic_ns()) / 1e9
        if delay > 0:
            await asyncio.sleep(delay)
        end = t_go_ns + int(self.config.duration_s * 1e9)
        driver: asyncio.Task[None] | None = None
        if self.config.mode != "idle":
            self.running = True
            if self.config.rate != 0:
                driver = asyncio.create_task(self.pace(t_go_ns))
            else:
                for client in self.senders:
                    for _ in range(self.config.window):
                        if not self.try_send(client):
                            break
                if self.board is not None:
                    driver = asyncio.create_task(self.follow_board())
        await asyncio.sleep(max(0.0, (end - time.monotonic_ns()) / 1e9))
        self.running = False
        if driver is not None:
            await driver
        # wait for the answers to what was sent
        deadline = time.monotonic() + self.config.ack_timeout_s
        while time.monotonic() < deadline and self.unanswered() > 0:  # noqa: ASYNC110
            await asyncio.sleep(0.02)

    def unanswered(self) -> int:
        return self.counts["sent"] - self.counts["acked"] - sum(self.rejected.values())

    async def drain(self, acked: dict[int, int]) -> None:
        """Wait until every member here has every acked message (and reply), or time out."""
        expected, _ = self.tally.lost(acked, self.local_members)
        deadline = time.monotonic() + self.config.drain_timeout_s
        ai = self.config.mode == "ai"
        while time.monotonic() < deadline:
            replies_done = not ai or sum(self.replies_ended.values()) >= expected
            if self.tally.delivered_total >= expected and replies_done:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)  # duplicates, if any, would come right behind
        self.expected = acked

    def progress(self) -> dict[str, Any]:
        return {
            "ev": "progress",
            "connected": self.counts["connected"],
            "failed": self.counts["connect_failed"],
            "sent": self.counts["sent"],
            "acked": self.counts["acked"],
            "delivered": self.tally.delivered_total,
            "deltas": self.counts["deltas"],
            "replies": sum(self.replies_ended.values()),
            "disconnects": self.counts["disconnects"],
            "cpu_s": own_cpu_seconds(),
        }

    def report(self) -> dict[str, Any]:
        acked = self.expected
        expected, lost = self.tally.lost(acked, self.local_members)
        replies_expected = replies_missing = 0
        if self.config.mode == "ai":
            for conv, count in acked.items():
                want = count * self.local_members.get(conv, 0)
                replies_expected += want
                replies_missing += max(0, want - self.replies_ended.get(conv, 0))
        counts = dict(self.counts)
        counts.update(
            delivered=self.tally.delivered_total,
            duplicated=self.tally.duplicated,
            reordered=self.tally.reordered,
            gaps_seen=self.tally.gaps,
            expected_deliveries=expected,
            lost=lost,
            replies_expected=replies_expected,
            replies_ended=sum(self.replies_ended.values()),
            replies_missing=replies_missing,
            unanswered=max(0, self.unanswered()),
        )
        return {
            "ev": "report",
            "worker": self.index,
            "counts": counts,
            "rejected": dict(self.rejected),
            "close_codes": dict(self.close_codes),
            "finish_reasons": dict(self.finish),
            "errors": self.errors,
            "hist": {name: h.to_wire() for name, h in self.hist.items()},
            "first_send_ns": self.first_send_ns,
            "last_delivery_ns": max(self.last_delivery_ns, self.deliveries.last_ns),
            "cpu_run_s": own_cpu_seconds() - self.cpu_at_go,
            "cpu_total_s": own_cpu_seconds(),
        }

    async def close_all(self) -> None:
        self.shutting_down = True
        for client in self.clients:
            client.close()
        await asyncio.sleep(0.1)
        await self.setup.close()


def _filler(size: int) -> str:
    words = ("lorem ipsum dolor sit amet consectetur adipiscing elit " * (size // 8 + 1)).strip()
    return words[: max(1, size - 40)].strip() or "x"


def _emit(event: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(event, separators=(",", ":")) + "\n")
    sys.stdout.flush()
