"""The delta path of replies: the local provider's shared timer and the pump.

Real parts throughout: LocalProvider pushing from its timer, DeltaPump recording into a
memory or Redis resume buffer; only ``publish`` is a recorder (it stands for the broker).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import pytest
from redis.asyncio import Redis

from chatserver.agents import Agent
from chatserver.fanout.events import Event, framed
from chatserver.generation import sources
from chatserver.generation.buffer import MemoryReplyBuffer, ReplyBuffer
from chatserver.generation.gemini_common import GeminiConfig, RetryPolicy
from chatserver.generation.gemini_sse import GeminiSseProvider
from chatserver.generation.local import LocalProvider
from chatserver.generation.provider import Finish, ReplyRequest
from chatserver.generation.redis_buffer import RedisReplyBuffer
from chatserver.generation.streaming import DeltaPump, ReplyRun
from protocol import Delta, Encoding, Message, Usage
from storage.redis_keys import ConversationKeys
from tests.fakegemini import FakeGemini, Stream
from tests.services import RedisServer

from ..conftest import eventually

AGENT = Agent("general", "General", "", "local", "")


def _message(text: str, conv: str = "c1") -> Message:
    return Message("m1", conv, 1, "user", text, "2026-01-01T00:00:00.000Z", user_id="u")


def _request(text: str) -> ReplyRequest:
    return ReplyRequest("general", "local", "", (_message(text),), 0.7, 1024)


class Recorder:
    """The sink a test reads: every chunk with the loop time it arrived, then the finish."""

    def __init__(self) -> None:
        self.chunks: list[tuple[float, str]] = []
        self.finishes: list[Finish] = []
        self.ended = asyncio.Event()

    def chunk(self, text: str) -> None:
        self.chunks.append((asyncio.get_running_loop().time(), text))

    def finish(self, finish: Finish) -> None:
        self.finishes.append(finish)
        self.ended.set()

    @property
    def text(self) -> str:
        return "".join(t for _, t in self.chunks)


async def test_many_streams_share_one_timer_and_keep_their_pace() -> None:
    provider = LocalProvider(ttft_ms=20, token_ms=5)
    sinks = [Recorder() for _ in range(200)]
    started = asyncio.get_running_loop().time()
    for index, sink in enumerate(sinks):
        provider.open(_request(f"stream {index} says hello"), sink)
    assert provider.active == 200
    await asyncio.wait_for(asyncio.gather(*(s.ended.wait() for s in sinks)), 10)
    assert provider.active == 0
    for index, sink in enumerate(sinks):
        assert sink.text.startswith(f"You said: stream {index} says hello")
        assert len(sink.finishes) == 1 and sink.finishes[0].reason == "stop"
        words = len(sink.text.split(" "))
        assert sink.finishes[0].usage.output_tokens == words
        # Paced: the first word after the TTFT, the last a pace per word later (a word
        # may leave up to a millisecond early: the timer works in millisecond slots).
        first, last = sink.chunks[0][0], sink.chunks[-1][0]
        assert first - started >= 0.020 - 0.0015
        assert last - started >= 0.020 + 0.005 * (words - 1) - 0.0015


async def test_cancelling_one_stream_leaves_the_others_running() -> None:
    provider = LocalProvider(ttft_ms=5, token_ms=5)
    cancelled, kept = Recorder(), Recorder()
    handle = provider.open(_request(" ".join(["word"] * 200)), cancelled)
    provider.open(_request("a b c"), kept)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while len(cancelled.chunks) < 3:
        assert loop.time() < deadline, "no words came"
        await asyncio.sleep(0.005)
    handle.cancel()
    assert provider.active == 1
    seen = len(cancelled.chunks)
    await asyncio.wait_for(kept.ended.wait(), 5)
    assert kept.text.startswith("You said: a b c")
    assert len(cancelled.chunks) == seen and not cancelled.finishes  # nothing after cancel
    assert provider.active == 0


async def test_a_late_wake_catches_up_instead_of_slowing_down() -> None:
    provider = LocalProvider(ttft_ms=5, token_ms=10)
    sink = Recorder()
    provider.open(_request(" ".join(["word"] * 40)), sink)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while len(sink.chunks) < 2:
        assert loop.time() < deadline, "no words came"
        await asyncio.sleep(0.005)
    loop.call_soon(_stall, 0.08)  # a long callback: ~8 words fall due meanwhile
    await asyncio.wait_for(sink.ended.wait(), 10)
    times = [at for at, _ in sink.chunks]
    # Words of one wake arrive microseconds apart; paced ones 10 ms apart.
    together = max(sum(1 for t in times if start <= t < start + 0.002) for start in times)
    assert together >= 5, "the words due during the stall did not go out together"


class Broken(Recorder):
    def chunk(self, text: str) -> None:
        raise RuntimeError("a bug in a sink")


async def test_a_failing_sink_ends_its_stream_only(caplog: pytest.LogCaptureFixture) -> None:
    provider = LocalProvider(ttft_ms=5, token_ms=2)
    broken, kept = Broken(), Recorder()
    provider.open(_request("x y z"), broken)
    provider.open(_request("a b c"), kept)
    await asyncio.wait_for(kept.ended.wait(), 5)
    assert kept.text.startswith("You said: a b c") and not broken.finishes
    assert provider.active == 0
    assert "local stream failed" in caplog.text


def _stall(seconds: float) -> None:
    time.sleep(seconds)


class Published:
    """The broker's ``publish_many``: each batch's events, checked to be whole deltas."""

    def __init__(self) -> None:
        self.frames: list[dict[str, Any]] = []
        self.batches = 0

    async def __call__(self, events: Sequence[Event]) -> None:
        self.batches += 1
        for event in events:
            frame = event.frame
            assert frame["conversation_id"] == event.conversation_id
            assert (event.generation_id, event.seq) == (frame["generation_id"], frame["seq"])
            assert event.framed(False) == framed(frame, Encoding.JSON)
            self.frames.append(frame)


def _pump(buffer: ReplyBuffer, published: Published) -> tuple[DeltaPump, list[ReplyRun]]:
    firsts: list[ReplyRun] = []
    return DeltaPump(buffer, published, firsts.append), firsts


async def _begin(buffer: ReplyBuffer, pump: DeltaPump, conv: str) -> ReplyRun:
    run = ReplyRun(conv, AGENT, "local", _message("hi", conv), pump)
    run.done = asyncio.get_running_loop().create_future()
    assert await buffer.begin(run.owner("server-a"))
    return run


async def test_chunks_become_ordered_deltas_recorded_before_the_end(buffer: ReplyBuffer) -> None:
    published = Published()
    pump, firsts = _pump(buffer, published)
    provider = LocalProvider(ttft_ms=5, token_ms=2)
    runs = [await _begin(buffer, pump, f"c{i}") for i in range(20)]
    for index, run in enumerate(runs):
        run.handle = provider.open(_request(f"question number {index}"), run)
    finishes = await asyncio.wait_for(asyncio.gather(*(r.done for r in runs)), 10)
    assert all(f is not None and f.reason == "stop" for f in finishes)
    assert firsts == sorted(firsts, key=lambda r: r.first_token_at or 0) and len(firsts) == 20
    for index, run in enumerate(runs):
        frames = [f for f in published.frames if f["generation_id"] == run.generation_id]
        assert [f["seq"] for f in frames] == list(range(1, len(frames) + 1))
        text = "".join(f["text"] for f in frames)
        assert text.startswith(f"You said: question number {index}")
        assert text == "".join(run.parts)
        snapshot = await buffer.snapshot(run.conversation_id)
        assert snapshot is not None and (snapshot.seq, snapshot.text) == (run.seq, text)


async def test_a_run_whose_lease_is_lost_stops_alone(buffer: ReplyBuffer) -> None:
    published = Published()
    pump, _ = _pump(buffer, published)
    provider = LocalProvider(ttft_ms=5, token_ms=5)
    kept, taken = await _begin(buffer, pump, "c1"), await _begin(buffer, pump, "c2")
    kept.handle = provider.open(_request("a b c d e f"), kept)
    taken.handle = provider.open(_request(" ".join(["word"] * 200)), taken)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while taken.seq < 2:
        assert loop.time() < deadline, "no deltas came"
        await asyncio.sleep(0.005)
    await buffer.end("c2", taken.generation_id)  # as if another instance took it over
    assert await asyncio.wait_for(taken.done, 5) is None  # cut short: no finish
    assert taken.lost and provider.active <= 1
    finish = await asyncio.wait_for(kept.done, 5)
    assert finish is not None and finish.reason == "stop" and not kept.lost


async def test_deltas_that_cannot_be_recorded_are_not_published(
    redis_url: str, redis_server: RedisServer
) -> None:
    redis = Redis.from_url(redis_url)
    buffer = RedisReplyBuffer(redis, server_id="server-a", lease_s=5)
    try:
        published = Published()
        pump, _ = _pump(buffer, published)
        provider = LocalProvider(ttft_ms=50, token_ms=5)
        run = await _begin(buffer, pump, "c1")
        # Redis goes away before the stream opens: before the first word, however slow the
        # machine (stopping it after the open raced the first word under load).
        redis_server.stop()
        run.handle = provider.open(_request("a b c"), run)
        assert await asyncio.wait_for(run.done, 10) is None
        assert run.failure is not None and run.failure.startswith("reply failed: ")
        assert published.frames == [] and provider.active == 0
    finally:
        await redis.aclose()


class _RecordFails(MemoryReplyBuffer):
    """A buffer whose store goes away once replies are under way: every record raises."""

    async def record(self, records: Sequence[Any]) -> set[str]:
        raise ConnectionError("Connection closed by server.")


async def test_a_failed_record_fails_its_replies_and_the_pump_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    buffer = _RecordFails()
    published = Published()
    pump, _ = _pump(buffer, published)
    provider = LocalProvider(ttft_ms=5, token_ms=2)
    runs = [await _begin(buffer, pump, f"c{i}") for i in range(3)]
    for run in runs:
        run.handle = provider.open(_request("a b c"), run)
    assert await asyncio.wait_for(asyncio.gather(*(r.done for r in runs)), 10) == [None] * 3
    assert all(r.failure == "reply failed: ConnectionError" for r in runs)
    assert published.frames == []
    assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text


def test_a_runs_delta_frame_is_the_protocol_delta() -> None:
    run = ReplyRun(
        "c1", AGENT, "local", _message("hi"), DeltaPump(MemoryReplyBuffer(), Published(), print)
    )
    run.seq = 7
    built = run.template.frame(run.seq, "some text")
    assert built == Delta("c1", run.generation_id, 7, "some text").to_dict()
    assert list(built) == list(Delta("c1", run.generation_id, 7, "some text").to_dict())


async def test_a_pulled_provider_waits_for_the_pump_past_its_backlog(
    buffer: ReplyBuffer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Gemini (pull) through the same pump: a fast upstream never piles up unbounded."""
    monkeypatch.setattr(sources, "BACKLOG_LIMIT", 3)
    chunks = [f"w{i} " for i in range(200)]
    fake = FakeGemini(Stream(chunks, pace_s=0.0))  # every event in one write: no pause
    provider = GeminiSseProvider(
        GeminiConfig("test-key", await fake.start(), timeout_s=5, retry=RetryPolicy())
    )
    try:
        published = Published()
        pump, _ = _pump(buffer, published)
        run = await _begin(buffer, pump, "c1")
        sources.start_stream(provider, None, _request("hi"), run)
        finish = await asyncio.wait_for(run.done, 10)
        assert finish is not None and finish.reason == "stop"
        texts = [f["text"] for f in published.frames]
        assert "".join(texts) == "".join(chunks)
        assert [f["seq"] for f in published.frames] == list(range(1, len(texts) + 1))
        assert max(t.count("w") for t in texts) <= 3  # never more than the backlog at once
    finally:
        await provider.close()
        await fake.close()


class _Upstream:
    def cancel(self) -> None:
        pass


async def test_a_text_no_codec_takes_fails_its_own_reply_only() -> None:
    buffer = MemoryReplyBuffer()
    published = Published()
    pump, _ = _pump(buffer, published)
    bad, good = await _begin(buffer, pump, "c1"), await _begin(buffer, pump, "c2")
    bad.handle = good.handle = _Upstream()  # a stream to stop, as the provider's would be
    bad.chunk("lone \ud800 surrogate")
    good.chunk("fine words")
    good.finish(Finish("stop", Usage(1, 2)))
    assert await asyncio.wait_for(bad.done, 5) is None  # cut short: no finish
    assert bad.failure == "reply failed: UnicodeEncodeError"
    finish = await asyncio.wait_for(good.done, 5)
    assert finish is not None and finish.reason == "stop" and good.failure is None
    assert [(f["conversation_id"], f["text"]) for f in published.frames] == [("c2", "fine words")]


async def test_an_ended_reply_is_not_checkpointed_after_its_answer(buffer: ReplyBuffer) -> None:
    """An unwatched reply's text reaches the buffer only at checkpoints. Once it ended, its
    answer's append stores the whole text and releases the buffer entry: a checkpoint then
    would find the entry gone and take the reply for one taken over by another instance."""
    delivered: list[Event] = []
    pump = DeltaPump(buffer, Published(), lambda run: None, delivered.extend)
    provider = LocalProvider(ttft_ms=5, token_ms=2)
    run = await _begin(buffer, pump, "c1")
    run.watched = False  # as its slot says when no other instance has a member in
    run.handle = provider.open(_request("a b c"), run)
    finish = await asyncio.wait_for(run.done, 10)
    assert finish is not None and finish.reason == "stop"
    assert delivered and run.saved < len(run.parts)  # delivered here, not yet recorded
    await buffer.end("c1", run.generation_id)  # the answer's append released the entry
    pump.checkpoint([run])  # the heartbeat, while the run is still finishing
    assert not run.checkpoint_due  # nothing to record: its answer holds the whole text


async def test_a_watched_reply_s_entry_is_extended_with_each_heartbeat(redis_url: str) -> None:
    """A watched run records every delta, which extends nothing: the heartbeat's checkpoint
    does, so a reply streaming longer than its entry's time to live keeps it."""
    redis = Redis.from_url(redis_url)
    try:
        buffer = RedisReplyBuffer(redis, server_id="server-a", lease_s=5.0)
        pump = DeltaPump(buffer, Published(), lambda run: None)
        run = await _begin(buffer, pump, "c-long")
        assert run.watched  # until the slot says otherwise
        entry = ConversationKeys("chat", "c-long").reply
        await redis.pexpire(entry, 500)  # most of its time to live gone, still streaming
        pump.checkpoint([run])
        assert run.checkpoint_due

        async def extended() -> bool:
            return int(await redis.pttl(entry)) > 50_000  # 12 leases again

        await eventually(extended)
        assert (await buffer.snapshot("c-long")) is not None
    finally:
        await redis.aclose()
