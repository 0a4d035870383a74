"""An idle batch writer: it waits long between reads of the outbox, and neither a message
nor a stop waits with it (every outbox and store in conftest)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import pytest

from storage import Outbox, Store

from .test_batch_writer import DEADLINE_S, Progress, fast_writer, fill, stored

if TYPE_CHECKING:
    from conftest import MessageFactory


class WatchedOutbox:
    """The real outbox; ``reading`` is set while a read of it waits (a test waits for that)."""

    def __init__(self, inner: Outbox) -> None:
        self.inner = inner
        self.reading = asyncio.Event()

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    async def read(self, max_count: int, max_wait_s: float) -> list[object]:
        self.reading.set()
        try:
            return await self.inner.read(max_count, max_wait_s)  # type: ignore[return-value]
        finally:
            self.reading.clear()

    def interrupt(self) -> None:
        self.inner.interrupt()

    async def in_read(self) -> None:
        await asyncio.wait_for(self.reading.wait(), DEADLINE_S)


@pytest.mark.parametrize("ending", ["stop", "finish"])
async def test_a_long_idle_wait_holds_neither_a_message_nor_a_stop(
    outbox: Outbox, store: Store, new_message: MessageFactory, ending: str
) -> None:
    """An idle writer waits long between reads (a wake-up a second by default, not twenty):
    a message still ends the wait at once, and stopping or finishing cuts it short."""
    progress = Progress()
    watched = WatchedOutbox(outbox)
    writer = fast_writer(watched, store, progress, max_wait_ms=600_000)  # type: ignore[arg-type]
    writer.start()
    await watched.in_read()
    await fill(outbox, new_message, 1)
    await progress.wait_for(written=1)  # within DEADLINE_S, not the ten minutes
    await watched.in_read()
    ended = writer.stop(drain=True) if ending == "stop" else writer.finish()
    await asyncio.wait_for(ended, DEADLINE_S)
    assert not writer.running and not watched.reading.is_set()
    assert await outbox.backlog() == 0 and len(await stored(store)) == 1
