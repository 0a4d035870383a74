"""The batch writer against the real outboxes and stores (every implementation in conftest)."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from protocol import Message
from storage import BatchWriter, MemoryOutbox, Outbox, SqliteStore, Store, StoreUnavailable
from storage.batch_writer import WriterLoad

if TYPE_CHECKING:
    from conftest import MessageFactory

DEADLINE_S = 10.0


class FlakyStore:
    """The real store underneath; its first ``failures`` writes raise ``StoreUnavailable``.

    With ``after_commit`` the write is committed before the error, like a connection that
    drops while the COMMIT's answer is on its way back.
    """

    def __init__(self, inner: Store, failures: int, *, after_commit: bool = False) -> None:
        self.inner = inner
        self.name = f"flaky-{inner.name}"
        self.failures = failures
        self.after_commit = after_commit
        self.attempts: list[list[str]] = []  # message ids of each write attempt

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    async def write_messages(self, messages: Sequence[Message]) -> int:
        self.attempts.append([m.id for m in messages])
        if self.failures > 0:
            self.failures -= 1
            if self.after_commit:
                await self.inner.write_messages(messages)
            raise StoreUnavailable("injected outage")
        return await self.inner.write_messages(messages)


class Progress:
    """on_batch/on_error sink that lets a test wait for a total instead of sleeping."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.errors: list[BaseException] = []
        self._changed = asyncio.Event()

    def on_batch(self, size: int, seconds: float) -> None:
        assert seconds >= 0
        self.sizes.append(size)
        self._changed.set()

    def on_error(self, exc: BaseException) -> None:
        self.errors.append(exc)
        self._changed.set()

    async def wait_for(self, written: int = 0, errors: int = 0) -> None:
        async with asyncio.timeout(DEADLINE_S):
            while sum(self.sizes) < written or len(self.errors) < errors:
                self._changed.clear()
                await self._changed.wait()


async def fill(outbox: Outbox, new_message: MessageFactory, n: int, cids: int = 3) -> list[Message]:
    messages = [new_message(f"c{i % cids}") for i in range(n)]
    for m in messages:
        await outbox.add(m)
    return messages


async def stored(store: Store, cids: int = 3) -> list[Message]:
    out: list[Message] = []
    for i in range(cids):
        page = await store.messages_before(f"c{i}", None, 1_000_000)
        out.extend(page.messages)
    return out


def fast_writer(outbox: Outbox, store: Store, progress: Progress, **kw: object) -> BatchWriter:
    return BatchWriter(
        outbox,
        store,
        backoff_initial_s=0.001,
        backoff_max_s=0.005,
        on_batch=progress.on_batch,
        on_error=progress.on_error,
        **kw,  # type: ignore[arg-type]
    )


async def test_messages_flow_to_the_store_exactly_once(
    outbox: Outbox, store: Store, new_message: MessageFactory
) -> None:
    progress = Progress()
    writer = fast_writer(outbox, store, progress)
    first = await fill(outbox, new_message, 200)
    writer.start()
    try:
        await progress.wait_for(written=200)
        # The running loop also picks up what arrives later.
        second = await fill(outbox, new_message, 50)
        await progress.wait_for(written=250)
    finally:
        await writer.stop(drain=True)
    got = await stored(store)
    assert sorted(m.id for m in got) == sorted(m.id for m in first + second)
    assert writer.written == 250 and sum(progress.sizes) == 250
    assert await outbox.backlog() == 0
    assert progress.errors == []


async def test_outage_is_retried_with_the_same_batch(
    outbox: Outbox, store: Store, new_message: MessageFactory
) -> None:
    flaky = FlakyStore(store, failures=3)
    progress = Progress()
    writer = fast_writer(outbox, flaky, progress)  # type: ignore[arg-type]
    messages = await fill(outbox, new_message, 100)
    writer.start()
    try:
        await progress.wait_for(written=100)
    finally:
        await writer.stop(drain=True)
    assert len(progress.errors) == 3
    assert all(isinstance(e, StoreUnavailable) for e in progress.errors)
    assert flaky.attempts[0] == flaky.attempts[1] == flaky.attempts[2] == flaky.attempts[3]
    assert sorted(m.id for m in await stored(store)) == sorted(m.id for m in messages)
    assert await outbox.backlog() == 0


async def test_failure_after_commit_replays_harmlessly(
    outbox: Outbox, store: Store, new_message: MessageFactory
) -> None:
    flaky = FlakyStore(store, failures=2, after_commit=True)
    progress = Progress()
    writer = fast_writer(outbox, flaky, progress)  # type: ignore[arg-type]
    messages = await fill(outbox, new_message, 30)
    writer.start()
    try:
        await progress.wait_for(written=30)
    finally:
        await writer.stop(drain=True)
    got = await stored(store)
    assert len(got) == 30  # each once, though the batch was committed three times
    assert sorted(m.id for m in got) == sorted(m.id for m in messages)
    assert writer.written == 0  # the successful replay found everything already there


async def test_stop_drains_everything(
    outbox: Outbox, store: Store, new_message: MessageFactory
) -> None:
    writer = BatchWriter(outbox, store, max_batch=64)
    writer.start()
    messages = await fill(outbox, new_message, 1_000)
    await writer.stop(drain=True)
    assert await outbox.backlog() == 0
    assert len(await stored(store)) == len(messages)
    assert not writer.running


async def test_finish_writes_the_batch_in_hand_and_leaves_the_rest(
    outbox: Outbox, store: Store, new_message: MessageFactory
) -> None:
    """How an instance stops on a shared outbox: nothing it read is left pending."""
    progress = Progress()
    writer = fast_writer(outbox, store, progress, max_batch=50)
    messages = await fill(outbox, new_message, 1_000)
    writer.start()
    await progress.wait_for(written=50)
    await writer.finish()
    assert not writer.running
    written = len(await stored(store))
    assert written == sum(progress.sizes) and 50 <= written < 1_000
    assert await outbox.backlog() == 1_000 - written  # only unread entries remain
    successor = fast_writer(outbox, store, Progress())
    await successor.stop(drain=True)  # another instance's writer takes the rest
    assert sorted(m.id for m in await stored(store)) == sorted(m.id for m in messages)


async def test_stop_drains_even_if_never_started(
    outbox: Outbox, store: Store, new_message: MessageFactory
) -> None:
    await fill(outbox, new_message, 10)
    await BatchWriter(outbox, store).stop(drain=True)
    assert await outbox.backlog() == 0
    assert len(await stored(store)) == 10


async def test_stop_gives_up_after_the_timeout_without_losing_entries(
    outbox: Outbox, store: Store, new_message: MessageFactory
) -> None:
    down = FlakyStore(store, failures=10**9)
    progress = Progress()
    writer = fast_writer(outbox, down, progress)  # type: ignore[arg-type]
    await fill(outbox, new_message, 20)
    writer.start()
    await progress.wait_for(errors=2)
    await asyncio.wait_for(writer.stop(drain=True, timeout_s=0.2), DEADLINE_S)
    assert not writer.running
    assert await outbox.backlog() == 20  # still there for the next writer
    assert await stored(store) == []


async def test_batches_grow_with_the_backlog(
    outbox: Outbox, store: Store, new_message: MessageFactory
) -> None:
    progress = Progress()
    writer = fast_writer(outbox, store, progress, max_batch=1_000)
    await fill(outbox, new_message, 5_000)
    writer.start()
    try:
        await progress.wait_for(written=5_000)
    finally:
        await writer.stop(drain=True)
    assert progress.sizes == [1_000] * 5
    assert len(await stored(store)) == 5_000


async def test_default_batch_takes_the_whole_backlog(
    outbox: Outbox, store: Store, new_message: MessageFactory
) -> None:
    progress = Progress()
    writer = fast_writer(outbox, store, progress)
    await fill(outbox, new_message, 5_000)
    writer.start()
    try:
        await progress.wait_for(written=5_000)
    finally:
        await writer.stop(drain=True)
    assert progress.sizes == [5_000]


async def test_a_paced_writer_gathers_what_comes_during_its_interval(
    outbox: Outbox, store: Store, new_message: MessageFactory
) -> None:
    """A lone message is stored at once; the ones that trickle in while the writer waits out
    its interval go in one batch, not one each."""
    progress = Progress()
    writer = fast_writer(outbox, store, progress, min_interval_ms=1_000)
    writer.start()
    try:
        await fill(outbox, new_message, 1)
        await progress.wait_for(written=1)
        await fill(outbox, new_message, 10)  # one by one, well within the interval
        await progress.wait_for(written=11)
    finally:
        await writer.stop(drain=True)
    assert progress.sizes == [1, 10]


async def test_pacing_never_holds_a_stop(
    outbox: Outbox, store: Store, new_message: MessageFactory
) -> None:
    progress = Progress()
    writer = fast_writer(outbox, store, progress, min_interval_ms=600_000)
    writer.start()
    await fill(outbox, new_message, 1)
    await progress.wait_for(written=1)
    await fill(outbox, new_message, 5)  # the writer waits out its ten minutes
    await asyncio.wait_for(writer.stop(drain=True), DEADLINE_S)
    assert await outbox.backlog() == 0
    assert len(await stored(store)) == 6


async def test_a_locked_sqlite_file_is_waited_out(
    tmp_path: Path, new_message: MessageFactory
) -> None:
    """A real outage of the real store: another connection holds the write lock."""
    path = str(tmp_path / "chat.db")
    store = SqliteStore(path, busy_timeout_ms=20)
    await store.start()
    outbox = MemoryOutbox()
    locker = sqlite3.connect(path, isolation_level=None)
    try:
        locker.execute("BEGIN IMMEDIATE")
        progress = Progress()
        writer = fast_writer(outbox, store, progress)
        messages = await fill(outbox, new_message, 50)
        writer.start()
        await progress.wait_for(errors=2)
        assert await stored(store) == [] and await outbox.backlog() == 50
        locker.execute("COMMIT")
        await progress.wait_for(written=50)
        await writer.stop(drain=True)
        assert all(isinstance(e, StoreUnavailable) for e in progress.errors)
        assert progress.sizes == [50]
        assert sorted(m.id for m in await stored(store)) == sorted(m.id for m in messages)
        assert await outbox.backlog() == 0
    finally:
        locker.close()
        await store.close()


@pytest.mark.parametrize("attempt", [1, 2, 3, 5, 10, 100, 10_000])
def test_backoff_grows_capped_with_jitter(attempt: int) -> None:
    writer = BatchWriter(
        None,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        backoff_initial_s=0.05,
        backoff_max_s=5.0,
    )
    ceiling = 5.0 if attempt > 20 else min(5.0, 0.05 * 2 ** (attempt - 1))
    delays = [writer.backoff_delay(attempt) for _ in range(50)]
    assert all(ceiling / 2 <= d <= ceiling for d in delays)
    assert len(set(delays)) > 1  # jittered


class HeldStore:
    """The real store underneath; each write takes ``delay_s``, and waits while ``open``
    is clear (``blocked``: writes waiting there now)."""

    def __init__(self, inner: Store, delay_s: float) -> None:
        self.inner = inner
        self.name = f"held-{inner.name}"
        self.delay_s = delay_s
        self.open = asyncio.Event()
        self.open.set()
        self.blocked = 0
        self.changed = asyncio.Event()

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    async def write_messages(self, messages: Sequence[Message]) -> int:
        self.blocked += 1
        self.changed.set()
        try:
            await self.open.wait()
        finally:
            self.blocked -= 1
        await asyncio.sleep(self.delay_s)  # a slow database: the batch takes this long
        return await self.inner.write_messages(messages)

    async def wait_blocked(self, count: int) -> None:
        async with asyncio.timeout(DEADLINE_S):
            while self.blocked < count:
                self.changed.clear()
                await self.changed.wait()


async def test_a_second_writer_stands_by_while_the_first_keeps_up(
    outbox: Outbox, store: Store, new_message: MessageFactory
) -> None:
    load = WriterLoad()
    progress = Progress()
    # A batch here takes far less than the interval, even on a loaded machine.
    paced = {"min_interval_ms": 400, "max_wait_ms": 20, "load": load}
    first = fast_writer(outbox, store, progress, **paced)
    second = fast_writer(outbox, store, progress, **paced, standby=True)
    first.start()
    second.start()
    try:
        for done in (10, 20):
            await fill(outbox, new_message, 10)
            await progress.wait_for(written=done)
    finally:
        await second.stop(drain=True)
        await first.stop(drain=True)
    assert not load.busy
    assert second.batches == 0 and first.written == 20
    assert len(await stored(store)) == 20


async def test_the_second_writer_joins_while_the_first_is_busy(
    outbox: Outbox, store: Store, new_message: MessageFactory
) -> None:
    load = WriterLoad()
    progress = Progress()
    held = HeldStore(store, delay_s=0.03)  # longer than the pacing interval: busy
    paced = {"min_interval_ms": 20, "max_wait_ms": 20, "load": load}
    first = fast_writer(outbox, held, progress, **paced)  # type: ignore[arg-type]
    second = fast_writer(outbox, held, progress, **paced, standby=True)  # type: ignore[arg-type]
    first.start()
    second.start()
    try:
        await fill(outbox, new_message, 10)
        await progress.wait_for(written=10)
        assert load.busy and second.batches == 0
        held.open.clear()
        await fill(outbox, new_message, 10)
        await held.wait_blocked(1)  # one writer holds that batch
        await fill(outbox, new_message, 10)
        await held.wait_blocked(2)  # the other took this one: both write at once
        held.open.set()
        await progress.wait_for(written=30)
    finally:
        held.open.set()
        await second.stop(drain=True)
        await first.stop(drain=True)
    assert second.batches >= 1
    got = await stored(store)
    assert len(got) == len({m.id for m in got}) == 30
