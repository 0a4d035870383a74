"""The harness's receive hot path: fan-out deliveries counted straight out of each read.

Flat out, a worker process takes a few hundred thousand frames a second, and its CPU per
frame decides how much of the machine is left to the server under test. So the frames that
carry a harness message are not handed to a callback one by one: ``CountingProtocol`` parses
the WebSocket frame headers of each read (as ``WsProtocol`` does) and accounts every message
frame in the same loop, its state in local variables:

- a message frame is recognised by its dialect's first bytes (``Dialect.message_prefixes``),
  and its marker (``~L`` + 32 hex digits, see ``accounting``) found with one search for ``~``;
- the marker is parsed once per message and process, not once per delivery: ``Deliveries``
  keeps an entry per message (conversation, sender, sequence number, send time, local
  deliveries still due) under the marker's bytes, dropped when the last local member got the
  message, which is also when this worker lets its sender's window open (``flow.py``: the
  other workers' members must have it too);
- order, duplicates and gaps are checked per receiver and sender exactly as ``Tally.see``
  does (the in-order case inline, anything else through it); the fresh in-order deliveries of
  one read are added to the tally once; every delivery's latency goes into the histogram.

Anything else (other frames, a message whose marker is not where the quick look expects it,
control frames) goes the general way. Every server the harness drives gets the same path:
the counts are exact; only the harness's cost per frame changes.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable

from .accounting import DUPLICATE, Receiver, Tally, unmark
from .stats import Histogram
from .wsclient import OnClose, OnPayload, WsProtocol

_TILDE = 0x7E
_L = 0x4C
_HIST_LAST = len(Histogram().counts) - 1

# An entry: [conversation, sender, seq, send time ns, local deliveries still due, key]
Entry = list[int]


class Deliveries:
    """What every connection of one worker shares to count fan-out deliveries."""

    __slots__ = (
        "cache",
        "counts",
        "hist",
        "last_ns",
        "local_members",
        "members",
        "on_done",
        "prefixes",
        "tally",
    )

    def __init__(
        self,
        tally: Tally,
        hist: Histogram,
        members: int,
        local_members: Counter[int],
        prefixes: tuple[bytes, ...],
        on_done: Callable[[int], None],
    ) -> None:
        self.tally = tally
        self.hist = hist
        self.counts = hist.counts
        self.members = members
        self.local_members = local_members  # live: filled while clients join
        self.prefixes = prefixes
        self.on_done = on_done  # (key): every local member has the message
        self.cache: dict[bytes, Entry] = {}
        self.last_ns = 0

    def entry(self, tag: bytes) -> Entry | None:
        """The entry of the message whose marker digits are ``tag``; None if not a marker."""
        entry = self.cache.get(tag)
        if entry is None:  # once per message and process: the marker's own parser
            parsed = unmark(tag.decode("ascii", "replace"))
            if parsed is None:
                return None
            sender, seq, sent_ns = parsed
            conv = sender // self.members
            local = self.local_members.get(conv, 0)
            entry = self.cache[tag] = [conv, sender, seq, sent_ns, local, (sender << 32) | seq]
        return entry

    def count(self, receiver: Receiver, tag: bytes, now: int) -> bool:
        """Account one delivery (the general path); False when ``tag`` is no marker."""
        entry = self.entry(tag)
        if entry is None:
            return False
        if self.tally.see(receiver, entry[0], entry[1], entry[2]) == DUPLICATE:
            return True
        self.last_ns = now
        self.hist.record_us((now - entry[3]) // 1000)
        self.delivered(tag, entry)
        return True

    def delivered(self, tag: bytes, entry: Entry) -> None:
        """One more local member has the message."""
        left = entry[4] - 1
        if left > 0:
            entry[4] = left
        else:
            self.cache.pop(tag, None)
            self.on_done(entry[5])


class CountingProtocol(WsProtocol):
    """A ``WsProtocol`` that accounts message frames itself, in its read loop."""

    def __init__(
        self,
        request: bytes,
        on_payload: OnPayload,
        on_close: OnClose,
        *,
        deliveries: Deliveries,
        receiver: Receiver,
        conv: int,
    ) -> None:
        super().__init__(request, on_payload, on_close)
        self._deliveries = deliveries
        self._receiver = receiver
        self._conv = conv  # the receiver's conversation: fresh deliveries are added to it

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        if not self._upgraded:
            data = self._handshake(data)
            if not data:
                return
        if self._rest:
            data = self._rest + data
            self._rest = b""
        now = time.monotonic_ns()
        size_all = len(data)
        pos = 0
        d = self._deliveries
        prefixes = d.prefixes
        cache = d.cache
        counts = d.counts
        receiver = self._receiver
        last = receiver.last
        conv = self._conv
        fresh = 0
        seen = False
        while size_all - pos >= 2:
            first = data[pos]
            size = data[pos + 1] & 0x7F
            start = pos + 2
            if size == 126:
                if size_all - pos < 4:
                    break
                size = (data[pos + 2] << 8) | data[pos + 3]
                start = pos + 4
            elif size == 127:
                if size_all - pos < 10:
                    break
                size = int.from_bytes(data[pos + 2 : pos + 10], "big")
                start = pos + 10
            end = start + size
            if end > size_all:
                break
            pos = end
            if (first == 0x81 or first == 0x82) and data.startswith(prefixes, start, end):
                at = data.find(_TILDE, start, end)
                if at >= 0 and at + 34 <= end and data[at + 1] == _L:
                    tag = data[at + 2 : at + 34]
                    entry = cache.get(tag)
                    if entry is None:
                        entry = d.entry(tag)
                    if entry is not None:
                        sender = entry[1]
                        seq = entry[2]
                        if entry[0] == conv and last.get(sender, 0) + 1 == seq:
                            last[sender] = seq  # in order: the common case
                            fresh += 1
                        elif d.tally.see(receiver, entry[0], sender, seq) == DUPLICATE:
                            continue
                        seen = True
                        us = (now - entry[3]) // 1000
                        if us < 2048:
                            counts[us if us > 0 else 0] += 1
                        else:  # stats.bucket_of, inline
                            shift = us.bit_length() - 11
                            us = (shift << 10) + (us >> shift)
                            counts[us if us < _HIST_LAST else _HIST_LAST] += 1
                        left = entry[4] - 1
                        if left > 0:
                            entry[4] = left
                        else:
                            d.delivered(tag, entry)
                        continue
            self._frame(first, data[start:end], now)
        if fresh:
            tally = d.tally
            tally.delivered[conv] += fresh
            tally.delivered_total += fresh
        if seen:
            d.last_ns = now
        if pos < size_all:
            self._rest = data[pos:]
