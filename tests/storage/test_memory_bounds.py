"""The embedded window's memory, in bytes: idempotency records, windows, tombstones.

Sizes are measured with ``tracemalloc`` (what Python allocated for the structure), against
the figures docs/operations.md gives (Memory bounds).
"""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

import pytest

from protocol import Message, format_timestamp
from storage import MemoryOutbox, MemoryWindow, MessageDraft
from storage.window.idempotency import Accepted, IdempotencyRecords
from storage.window.memory import WINDOW_BYTES, message_bytes

MIB = 1024 * 1024


@contextmanager
def traced() -> Iterator[Callable[[], int]]:
    """Bytes Python allocated (and still holds) since the block began."""
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    try:
        yield lambda: tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()


def copy(text: str) -> str:
    """An equal string of its own, as every parsed frame's field is."""
    return "".join(list(text))


def question(
    conversation_id: str, offset: int, text: str = "lorem ipsum dolor sit amet"
) -> Message:
    """A user's message as the window holds it: every field a string of its own."""
    return Message(
        id=str(uuid.uuid4()),
        conversation_id=copy(conversation_id),
        offset=offset,
        role="user",
        text=copy(text),
        created_at=format_timestamp(datetime.now(UTC)),
        user_id=f"user-{offset:07d}",
        client_msg_id=str(uuid.uuid4()),
    )


def test_a_record_answers_a_resend_with_the_first_message_id_offset_and_time() -> None:
    records = IdempotencyRecords(10, ttl_s=60)
    first = question(str(uuid.uuid4()), 7)
    records.add(first)
    assert first.client_msg_id is not None
    found = records.get(first.conversation_id, first.user_id, first.client_msg_id)
    assert found == Accepted(first.id, 7, first.created_at)
    assert records.get(first.conversation_id, "someone else", first.client_msg_id) is None
    # Ids and times of another shape (a store's, a test's) come back exactly too.
    odd = Message("m-1", "c", 3, "assistant", "", "2026-01-02T03:04:05Z", client_msg_id="g")
    records.add(odd)
    assert records.get("c", None, "g") == Accepted("m-1", 3, "2026-01-02T03:04:05Z")


def test_records_expire_and_the_oldest_go_first_past_the_bound() -> None:
    now = [0.0]
    records = IdempotencyRecords(3, ttl_s=10, clock=lambda: now[0])
    messages = [question("c", i) for i in range(1, 5)]
    for m in messages[:3]:
        records.add(m)
    now[0] = 5.0
    records.add(messages[3])  # the fourth pushes the first out
    assert len(records) == 3
    keys = [(m.conversation_id, m.user_id, m.client_msg_id or "") for m in messages]
    assert not records.knows(*keys[0])
    assert all(records.knows(*k) for k in keys[1:])
    now[0] = 10.0  # the three added at 0 s are gone, the one of 5 s stays
    assert [records.knows(*k) for k in keys] == [False, False, False, True]


@pytest.mark.heavy  # 100,000 records under tracemalloc: 40-80 s, started first
def test_the_default_bound_of_records_holds_under_20_mb() -> None:
    """100,000 records where whole messages took ~240 MB: the issue's goal is <= 20 MB.
    (A record keeps none of the message's strings: the messages here may share theirs.)"""
    conversations = [str(uuid.uuid4()) for _ in range(100)]
    at = format_timestamp(datetime.now(UTC))
    with traced() as used:
        records = IdempotencyRecords(100_000, ttl_s=86400)
        for i in range(105_000):  # past the bound: it stays at the bound
            records.add(
                Message(
                    str(uuid.uuid4()),
                    conversations[i % 100],
                    i + 1,
                    "user",
                    "",
                    at,
                    user_id="user-0000042",
                    client_msg_id=str(uuid.uuid4()),
                )
            )
        assert len(records) == 100_000
        held = used()
    assert held <= 20 * MIB, f"{held / MIB:.1f} MiB"
    assert held <= 18.5 * MIB  # the figure docs/operations.md gives


async def test_a_resend_beyond_the_window_gets_the_first_message_id_offset_and_time() -> None:
    window, outbox = MemoryWindow(size=3), MemoryOutbox()
    await window.rebuild("c", [], 0)
    draft = MessageDraft("c", "user", "hello", user_id="u", client_msg_id="k")
    first = (await window.append(draft, outbox)).message
    again = await window.append(draft, outbox)
    assert again.duplicate and again.message is first  # still held: the window's own
    for _ in range(5):
        await window.append(MessageDraft("c", "user", "more", user_id="u"), outbox)
    later = await window.append(draft, outbox)
    assert later.duplicate
    assert (later.message.id, later.message.offset, later.message.created_at) == (
        first.id,
        first.offset,
        first.created_at,
    )
    assert later.message.text == "hello"
    assert (await window.read("c", limit=10)).last_offset == 6  # type: ignore[union-attr]


async def test_windows_stay_within_their_bytes() -> None:
    budget = 256 * 1024
    window, outbox = MemoryWindow(size=50, max_bytes=budget), MemoryOutbox()
    for c in range(40):
        cid = f"c{c}"
        await window.rebuild(cid, [], 0)
        for _ in range(60):
            await window.append(MessageDraft(cid, "user", "x" * 200, user_id="u"), outbox)
        assert window.bytes <= budget
    assert window.evictions > 0
    assert window.fill()["window_bytes"] == (window.bytes, budget)
    # What is left is counted exactly: the held messages' estimate and one per window.
    held = [w for w in window._windows.values()]
    assert window.bytes == sum(w.bytes for w in held)
    assert all(w.bytes == WINDOW_BYTES + sum(message_bytes(m) for m in w.messages) for w in held)


def test_the_estimate_of_a_held_message_covers_what_it_takes() -> None:
    """MESSAGE_BYTES (plus the text's own size) is what a window's message costs, measured:
    the window bound in bytes is honest, and not wildly above what is really held."""

    async def fill(window: MemoryWindow, messages: list[Message]) -> None:
        await window.rebuild("c", messages, len(messages))

    with traced() as used:
        messages = [question("c", i + 1, "word " * 20) for i in range(200)]
        window = MemoryWindow(size=200, max_bytes=1 << 30, max_idempotency_keys=1)
        asyncio.run(fill(window, messages))
        del messages
        held = used()
    assert held <= window.bytes
    assert held >= 0.6 * window.bytes


async def test_a_tombstone_only_for_a_window_the_store_may_lack() -> None:
    window, outbox = MemoryWindow(max_conversations=1, max_tombstones=2), MemoryOutbox()
    stored = [question("a", i + 1) for i in range(3)]
    await window.rebuild("a", stored, 3)  # the store has 1..3
    await window.rebuild("b", [], 0)  # evicts "a": nothing newer than the store
    assert window.fill()["window_tombstones"][0] == 0
    await window.append(MessageDraft("b", "user", "x", user_id="u"), outbox)
    await window.rebuild("a", stored, 3)  # evicts "b": its offset 1 is only in the outbox
    assert window._tombstones == {"b": 1}
    await window.rebuild("b", [], 0)  # the store has nothing yet: the tombstone says 1
    assert (
        await window.append(MessageDraft("b", "user", "y", user_id="u"), outbox)
    ).message.offset == 2
    for c in range(5):  # tombstones stay within their bound
        await window.rebuild(f"x{c}", [], 0)
        await window.append(MessageDraft(f"x{c}", "user", "x", user_id="u"), outbox)
    assert len(window._tombstones) <= 2
