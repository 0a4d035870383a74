"""Conformance of resume buffers (the Redis one joins with its issue)."""

from __future__ import annotations

import pytest

from chatserver.generation.buffer import MemoryReplyBuffer, ReplyBuffer


@pytest.fixture(params=["memory"])
def buffer(request: pytest.FixtureRequest) -> ReplyBuffer:
    return MemoryReplyBuffer()


async def test_text_so_far_and_last_seq(buffer: ReplyBuffer) -> None:
    assert await buffer.snapshot("c1") is None
    await buffer.begin("c1", "g1", "server-a")
    snap = await buffer.snapshot("c1")
    assert snap is not None and (snap.generation_id, snap.seq, snap.text) == ("g1", 0, "")
    await buffer.append("c1", "g1", 1, "Hello ")
    await buffer.append("c1", "g1", 2, "world")
    snap = await buffer.snapshot("c1")
    assert snap is not None and (snap.seq, snap.text) == (2, "Hello world")


async def test_end_clears_only_its_own_generation(buffer: ReplyBuffer) -> None:
    await buffer.begin("c1", "g1", "server-a")
    await buffer.end("c1", "other")
    assert await buffer.snapshot("c1") is not None
    await buffer.append("c1", "other", 1, "ignored")
    snap = await buffer.snapshot("c1")
    assert snap is not None and snap.text == ""
    await buffer.end("c1", "g1")
    assert await buffer.snapshot("c1") is None
