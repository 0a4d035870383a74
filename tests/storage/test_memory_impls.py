"""What only the in-process window and outbox have: their memory bounds and their helpers."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from storage import MemoryOutbox, MemoryWindow, MessageDraft, WindowMissing

if TYPE_CHECKING:
    from conftest import MessageFactory


def draft(cid: str, key: str | None = None) -> MessageDraft:
    return MessageDraft(conversation_id=cid, role="user", text="x", user_id="u1", client_msg_id=key)


async def test_many_conversations_stay_within_the_bounds() -> None:
    window = MemoryWindow(size=3, max_conversations=10, max_tombstones=25)
    outbox = MemoryOutbox()
    for i in range(100):
        cid = f"c{i}"
        await window.rebuild(cid, [], 0)
        for _ in range(5):
            await window.append(draft(cid), outbox)
    assert len(window) == 10
    assert window.evictions == 90
    assert len(window._tombstones) <= 25
    assert all(len(w.messages) <= 3 for w in window._windows.values())


async def test_idempotency_keys_are_bounded_oldest_first() -> None:
    window = MemoryWindow(max_idempotency_keys=3)
    outbox = MemoryOutbox()
    await window.rebuild("c", [], 0)
    for key in ("k1", "k2", "k3", "k4"):
        await window.append(draft("c", key), outbox)
    assert len(window._seen) == 3
    assert (await window.append(draft("c", "k4"), outbox)).duplicate
    assert not (await window.append(draft("c", "k1"), outbox)).duplicate  # fell off the end


async def test_expired_keys_are_pruned_by_the_clock() -> None:
    now = [0.0]
    window = MemoryWindow(idempotency_ttl_s=10, clock=lambda: now[0])
    outbox = MemoryOutbox()
    await window.rebuild("c", [], 0)
    first = await window.append(draft("c", "k"), outbox)
    now[0] = 9.9
    assert (await window.append(draft("c", "k"), outbox)).message == first.message
    now[0] = 10.0
    assert not (await window.append(draft("c", "k"), outbox)).duplicate


# Moved from the window conformance suite: LRU eviction by a count of conversations is the
# memory window's own bound (Redis bounds its windows with key TTLs instead).
async def test_eviction_is_bounded_and_offsets_survive_it() -> None:
    window, outbox = MemoryWindow(max_conversations=3), MemoryOutbox()
    for i in range(5):
        await window.rebuild(f"c{i}", [], 0)
        for _ in range(i + 1):
            await window.append(draft(f"c{i}"), outbox)
    present = [
        cid for cid in (f"c{i}" for i in range(5)) if await window.read(cid, limit=1) is not None
    ]
    assert present == ["c2", "c3", "c4"]  # the least recently used went first
    with pytest.raises(WindowMissing):
        await window.append(draft("c0"), outbox)
    # The store has nothing yet (everything is still in the outbox), yet offsets go on.
    await window.rebuild("c1", [], 0)
    view = await window.read("c1", limit=10)
    assert view is not None and view.last_offset == 2
    assert (await window.append(draft("c1"), outbox)).message.offset == 3


async def test_reads_keep_a_window_recent() -> None:
    window = MemoryWindow(max_conversations=2)
    await window.rebuild("a", [], 0)
    await window.rebuild("b", [], 0)
    assert await window.read("a", limit=1) is not None  # "b" is now the least recent
    await window.rebuild("c", [], 0)
    assert await window.read("b", limit=1) is None
    assert await window.read("a", limit=1) is not None


async def test_requeue_pending_hands_unacked_entries_out_again(
    new_message: MessageFactory,
) -> None:
    outbox = MemoryOutbox()
    for _ in range(4):
        await outbox.add(new_message("c"))
    lost = await outbox.read(3, 1.0)  # a writer that died holding these
    assert await outbox.requeue_pending() == 3
    again = await outbox.read(10, 1.0)
    assert [e.entry_id for e in again] == [e.entry_id for e in lost] + [again[-1].entry_id]
    assert await outbox.backlog() == 4


@settings(max_examples=200, deadline=None)
@given(
    appended=st.integers(min_value=0, max_value=30),
    size=st.integers(min_value=1, max_value=12),
    after=st.integers(min_value=0, max_value=35),
    before=st.one_of(st.none(), st.integers(min_value=0, max_value=35)),
    limit=st.integers(min_value=0, max_value=40),
)
def test_read_matches_a_plain_filter(
    appended: int, size: int, after: int, before: int | None, limit: int
) -> None:
    async def scenario() -> None:
        window, outbox = MemoryWindow(size=size), MemoryOutbox()
        await window.rebuild("c", [], 0)
        for _ in range(appended):
            await window.append(draft("c"), outbox)
        view = await window.read("c", after=after, before=before, limit=limit)
        assert view is not None
        held = list(range(max(1, appended - size + 1), appended + 1))
        wanted = [o for o in held if o > after and (before is None or o < before)]
        assert [m.offset for m in view.messages] == (wanted[-limit:] if limit else [])
        assert view.first_offset == (held[0] if held else appended + 1)

    asyncio.run(scenario())
