"""The embedded model: deterministic replies streamed word by word at a set pace.

All streams of a provider share one timer (``_Ticker``): millisecond slots of the streams
whose next word is due then, and a single ``call_at`` for the earliest. At 1,000 concurrent
replies and 15 ms a word that is ~66,000 words/s; a sleep per word per stream (a future, a
timer handle and a task step each) cost more CPU than the rest of the server's delta path,
while one timer wakes ~once a millisecond and hands out every word due by then.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
from collections.abc import AsyncIterator

from protocol import FinishReason, Role, Usage

from .provider import Chunk, ChunkSink, Finish, ReplyRequest, StreamItem

log = logging.getLogger("chatserver.generation")

# A word due within this much of now goes out on this wake: uvloop's clock and timers have
# millisecond resolution, so waiting for a sub-millisecond remainder would spin the loop.
_SLACK_S = 0.0005


_COUNTS_MAX_CHARS = 4_000_000  # texts kept for their word counts, then forgotten at once


def count_tokens(text: str) -> int:
    return len(text.split())


def compose_reply(request: ReplyRequest) -> str:
    """Echo the latest user message and transform it, so a test can predict every word."""
    last = next((m for m in reversed(request.history) if m.role == Role.USER.value), None)
    said = last.text.strip() if last is not None else ""
    if not said:
        return "I am listening. Say something and I will answer."
    words = said.split()
    return (
        f"You said: {said} "
        f"Backwards, that is: {' '.join(reversed(words))} "
        f"That was {len(words)} words and {len(said)} characters."
    )


class _Ended:
    """The sink of a stream that is over: anything still pushed goes nowhere."""

    __slots__ = ()

    def chunk(self, text: str) -> None:
        return None

    def finish(self, finish: Finish) -> None:
        return None


_ENDED = _Ended()


class _LocalStream:
    """One reply being pushed: its words, where it is, and where they go."""

    __slots__ = ("done", "due", "finish_item", "index", "provider", "sink", "words")

    def __init__(
        self, provider: LocalProvider, words: list[str], finish: Finish, sink: ChunkSink
    ) -> None:
        self.provider = provider
        self.words = words
        self.finish_item = finish
        self.sink = sink
        self.index = 0
        self.done = False
        self.due = 0.0  # loop time the next word is due

    def step(self) -> bool:
        """Push the next word (and the finish after the last); True while words remain."""
        words = self.words
        index = self.index
        sink = self.sink
        if index < len(words):
            last = index == len(words) - 1
            self.index = index + 1
            sink.chunk(words[index] if last else words[index] + " ")
            if self.done:  # the sink cancelled us: nothing more, not even the finish
                return False
            if not last:
                return True
        self._end()
        sink.finish(self.finish_item)
        return False

    def cancel(self) -> None:
        # Left in the ticker's heap: it is skipped (and dropped) when its turn comes.
        self._end()

    def redirect(self, sink: ChunkSink) -> None:
        if not self.done:
            self.sink = sink

    def _end(self) -> None:
        if not self.done:
            self.done = True
            self.provider.active -= 1
            # The sink (a reply's run) holds this stream as its handle: over, we let go of
            # it, so the reply is freed by reference counting, not left as a cycle for a
            # full collection (which the server runs rarely: cli.py).
            self.sink = _ENDED


class _Ticker:
    """One timer for every stream of a provider, always armed for the earliest due word.

    A timing wheel of millisecond slots (uvloop's clock resolution): a word due at ``t``
    waits in the slot of ``t``; a heap holds each slot's number once. So a word costs a
    list append, not a heap entry of its own, and a wake takes every slot that is due.
    """

    __slots__ = ("_armed_at", "_handle", "_heap", "_loop", "_slots")

    def __init__(self) -> None:
        self._slots: dict[int, list[_LocalStream]] = {}
        self._heap: list[int] = []
        self._handle: asyncio.TimerHandle | None = None
        self._armed_at = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    def add(self, stream: _LocalStream) -> None:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # a new loop (tests run several): the old timer is gone
            self._loop, self._slots, self._heap, self._handle = loop, {}, [], None
        slot = self._put(stream)
        if self._handle is None or slot < self._armed_at:
            self._arm(loop, slot)

    def _put(self, stream: _LocalStream) -> int:
        slot = int(stream.due * 1000)  # a word may leave up to a millisecond early
        waiting = self._slots.get(slot)
        if waiting is None:
            self._slots[slot] = [stream]
            heapq.heappush(self._heap, slot)
        else:
            waiting.append(stream)
        return slot

    def _arm(self, loop: asyncio.AbstractEventLoop, slot: int) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._armed_at = slot
        self._handle = loop.call_at(slot / 1000, self._fire)

    def _fire(self) -> None:
        self._handle = None
        loop = self._loop
        assert loop is not None
        heap, slots = self._heap, self._slots
        now = int((loop.time() + _SLACK_S) * 1000)
        while heap and heap[0] <= now:
            for stream in slots.pop(heapq.heappop(heap)):
                if stream.done:
                    continue  # cancelled: dropped here
                try:
                    more = stream.step()
                except Exception:  # a sink's bug ends its stream, not every stream's timer
                    log.exception("local stream failed")
                    stream.cancel()
                    continue
                if more:
                    # The next word is due a pace after this one was *due*, not after
                    # now: a late wake is caught up (the words that piled up go out
                    # together) instead of slowing every later word down.
                    stream.due += stream.provider.token_s
                    self._put(stream)
        if heap:
            self._arm(loop, heap[0])


class LocalProvider:
    name = "local"
    closes_between_items = True
    probe = None  # no upstream to ask: healthy() tells all

    def __init__(self, ttft_ms: int = 150, token_ms: int = 15) -> None:
        self.ttft_s = ttft_ms / 1000
        self.token_s = token_ms / 1000  # read at every word: tests change the pace mid-reply
        self.active = 0  # streams running now: tests watch a cancel reach the provider
        self._ticker = _Ticker()
        # Word counts of the texts seen lately: each reply counts its whole context window
        # (up to 50 messages), which it mostly shares with the conversation's previous reply.
        self._counts: dict[str, int] = {}
        self._counted_chars = 0

    def _words(self, text: str) -> int:
        """``count_tokens(text)``, remembered; the same sum as counting the joined prompt."""
        count = self._counts.get(text)
        if count is None:
            count = self._counts[text] = count_tokens(text)
            self._counted_chars += len(text)
            if self._counted_chars > _COUNTS_MAX_CHARS:
                self._counts = {text: count}
                self._counted_chars = len(text)
        return count

    def fill(self) -> dict[str, tuple[int, int]]:
        """Characters of the texts kept for their word counts, and the bound."""
        return {"local_model_counted_chars": (self._counted_chars, _COUNTS_MAX_CHARS)}

    def open(self, request: ReplyRequest, sink: ChunkSink) -> _LocalStream:
        """Push the reply into ``sink`` from the shared timer; ``cancel()`` stops it at once."""
        text = compose_reply(request)
        words_in = self._words(request.system_prompt)
        counts = self._counts  # the lookup inline: a call per message of the context showed
        for message in request.history:
            count = counts.get(message.text)
            words_in += self._words(message.text) if count is None else count
        words = text.split(" ")
        limit = request.max_output_tokens
        reason = FinishReason.STOP
        if len(words) > limit:
            words = words[:limit]
            reason = FinishReason.LENGTH
        finish = Finish(reason, Usage(words_in, len(words)))
        stream = _LocalStream(self, words, finish, sink)
        stream.due = asyncio.get_running_loop().time() + self.ttft_s
        self.active += 1
        self._ticker.add(stream)
        return stream

    async def stream(self, request: ReplyRequest) -> AsyncIterator[StreamItem]:
        # Bounded by construction: one item per word of the reply, plus the finish.
        queue: asyncio.Queue[StreamItem] = asyncio.Queue()
        handle = self.open(request, _QueueSink(queue))
        try:
            while True:
                item = await queue.get()
                yield item
                if isinstance(item, Finish):
                    return
        finally:
            handle.cancel()

    async def close(self) -> None:
        return None

    def healthy(self) -> bool:
        return True

    def thinks(self, model: str, thinking_budget: int | None) -> bool:
        return False  # it answers at its pace, whatever the agent's budget


class _QueueSink:
    __slots__ = ("_queue",)

    def __init__(self, queue: asyncio.Queue[StreamItem]) -> None:
        self._queue = queue

    def chunk(self, text: str) -> None:
        self._queue.put_nowait(Chunk(text))

    def finish(self, finish: Finish) -> None:
        self._queue.put_nowait(finish)
