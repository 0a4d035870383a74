"""One suite for every HotWindow implementation (see ``WINDOW_FACTORIES`` in conftest)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import pytest

from protocol import Message, Usage, format_timestamp, parse_timestamp
from storage import (
    AppendGate,
    AppendRefused,
    HotWindow,
    MessageDraft,
    Outbox,
    OutboxFull,
    WindowMissing,
)

if TYPE_CHECKING:
    from conftest import MakeWindow, MessageFactory

CID = "conv-1"


def draft(
    text: str = "hi", *, user: str = "u1", key: str | None = None, cid: str = CID
) -> MessageDraft:
    return MessageDraft(
        conversation_id=cid, role="user", text=text, user_id=user, client_msg_id=key
    )


async def append_n(window: HotWindow, outbox: Outbox, n: int, cid: str = CID) -> list[Message]:
    return [(await window.append(draft(f"m{i}", cid=cid), outbox)).message for i in range(n)]


async def everything(window: HotWindow, cid: str = CID) -> list[int]:
    view = await window.read(cid, limit=10_000)
    assert view is not None
    return [m.offset for m in view.messages]


async def test_append_to_a_missing_window_raises(
    window_pair: tuple[HotWindow, Outbox],
) -> None:
    window, outbox = window_pair
    with pytest.raises(WindowMissing):
        await window.append(draft(), outbox)
    assert await outbox.backlog() == 0


async def test_offsets_are_contiguous_and_fields_filled(
    window_pair: tuple[HotWindow, Outbox],
) -> None:
    window, outbox = window_pair
    await window.rebuild(CID, [], 0)
    before = datetime.now(UTC) - timedelta(seconds=1)
    results = [await window.append(draft(f"m{i}"), outbox) for i in range(3)]
    assert [r.message.offset for r in results] == [1, 2, 3]
    assert not any(r.duplicate for r in results)
    assert len({r.message.id for r in results}) == 3
    for r in results:
        uuid.UUID(r.message.id)
        created = parse_timestamp(r.message.created_at)
        assert format_timestamp(created) == r.message.created_at  # UTC, milliseconds
        assert before <= created <= datetime.now(UTC) + timedelta(seconds=1)
    view = await window.read(CID, limit=10)
    assert view is not None
    assert view.messages == tuple(r.message for r in results)
    assert view.last_offset == 3 and view.first_offset == 1


async def test_append_keeps_draft_fields_and_feeds_the_outbox(
    window_pair: tuple[HotWindow, Outbox],
) -> None:
    window, outbox = window_pair
    await window.rebuild(CID, [], 0)
    d = MessageDraft(
        conversation_id=CID,
        role="assistant",
        text="answer",
        agent_id="a1",
        finish_reason="stop",
        usage=Usage(4, 5),
        model="echo",
        reply_to="m-0",
    )
    message = (await window.append(d, outbox)).message
    assert (message.role, message.text, message.agent_id, message.finish_reason) == (
        "assistant",
        "answer",
        "a1",
        "stop",
    )
    assert (message.usage, message.model, message.reply_to) == (Usage(4, 5), "echo", "m-0")
    assert message.user_id is None
    entries = await outbox.read(10, 1.0)
    assert [e.message for e in entries] == [message]


async def test_duplicate_client_msg_id_returns_the_first(
    window_pair: tuple[HotWindow, Outbox],
) -> None:
    window, outbox = window_pair
    await window.rebuild(CID, [], 0)
    first = await window.append(draft("one", key="k1"), outbox)
    again = await window.append(draft("one, resent", key="k1"), outbox)
    assert again.duplicate and again.message == first.message
    assert await outbox.backlog() == 1
    assert await everything(window) == [1]
    # The key is per user and per conversation.
    other_user = await window.append(draft("two", user="u2", key="k1"), outbox)
    await window.rebuild("conv-2", [], 0)
    other_conv = await window.append(draft("three", key="k1", cid="conv-2"), outbox)
    assert not other_user.duplicate and other_user.message.offset == 2
    assert not other_conv.duplicate and other_conv.message.offset == 1
    # Without a client_msg_id nothing is deduplicated.
    a = await window.append(draft("same"), outbox)
    b = await window.append(draft("same"), outbox)
    assert (a.message.offset, b.message.offset) == (3, 4)


async def test_knows_a_sent_client_msg_id_of_that_user_and_conversation(
    window_pair: tuple[HotWindow, Outbox],
) -> None:
    window, outbox = window_pair
    await window.rebuild(CID, [], 0)
    assert not await window.knows(CID, "u1", "k1")
    await window.append(draft("one", key="k1"), outbox)
    assert await window.knows(CID, "u1", "k1")
    assert not await window.knows(CID, "u2", "k1")
    assert not await window.knows("conv-2", "u1", "k1")
    assert not await window.knows(CID, "u1", "k2")


# Counts its runs and refuses past A[1]: a stand-in for the limiter's send check.
COUNTING_GATE = (
    "local n = redis.call('INCR', K[1]) if n > tonumber(A[1]) then return {7, n} end return {0, n}"
)


async def test_a_gate_decides_in_the_appends_own_step(
    window_pair: tuple[HotWindow, Outbox],
) -> None:
    window, outbox = window_pair
    counter = f"gate-test:{uuid.uuid4()}"
    gate = AppendGate(COUNTING_GATE, (counter,), (2,))
    if not window.gates:  # no atomic step to share: the caller checks first, on its own
        with pytest.raises(TypeError):
            await window.append(draft(), outbox, gate)
        return
    redis = window.redis  # type: ignore[attr-defined]
    with pytest.raises(WindowMissing):  # a missing window is rebuilt, then retried ...
        await window.append(draft(), outbox, gate)
    assert await redis.get(counter) is None  # ... so the gate has not run yet
    await window.rebuild(CID, [], 0)
    first = await window.append(draft("one", key="k1"), outbox, gate)
    await window.append(draft("two"), outbox, gate)
    with pytest.raises(AppendRefused) as refused:
        await window.append(draft("three"), outbox, gate)
    assert (refused.value.code, refused.value.value) == (7, 3)
    assert await everything(window) == [1, 2]  # nothing appended, nothing queued
    assert await outbox.backlog() == 2
    # A resend of an accepted message is answered before the gate: never refused for it.
    again = await window.append(draft("one", key="k1"), outbox, gate)
    assert again.duplicate and again.message.id == first.message.id
    assert int(await redis.get(counter)) == 3
    # Without a gate, the same window appends as before.
    assert (await window.append(draft("four"), outbox)).message.offset == 3


async def test_duplicate_detection_expires(make_window: MakeWindow) -> None:
    window, outbox = await make_window(idempotency_ttl_s=0)
    await window.rebuild(CID, [], 0)
    first = await window.append(draft(key="k1"), outbox)
    assert not await window.knows(CID, "u1", "k1")
    second = await window.append(draft(key="k1"), outbox)
    assert not second.duplicate
    assert second.message.offset == first.message.offset + 1


async def test_window_is_trimmed_to_size(make_window: MakeWindow) -> None:
    window, outbox = await make_window(size=5)
    await window.rebuild(CID, [], 0)
    await append_n(window, outbox, 12)
    view = await window.read(CID, limit=100)
    assert view is not None
    assert [m.offset for m in view.messages] == [8, 9, 10, 11, 12]
    assert (view.first_offset, view.last_offset) == (8, 12)
    assert await outbox.backlog() == 12  # trimming the window never drops unpersisted messages


async def test_read_after_before_limit(window_pair: tuple[HotWindow, Outbox]) -> None:
    window, outbox = window_pair
    await window.rebuild(CID, [], 0)
    await append_n(window, outbox, 10)

    async def offsets(**kw: int) -> list[int]:
        view = await window.read(CID, **kw)  # type: ignore[arg-type]
        assert view is not None and view.last_offset == 10 and view.first_offset == 1
        return [m.offset for m in view.messages]

    assert await offsets(limit=3) == [8, 9, 10]
    assert await offsets(after=6, limit=100) == [7, 8, 9, 10]
    assert await offsets(after=6, limit=2) == [9, 10]  # the newest ``limit``, oldest first
    assert await offsets(before=5, limit=100) == [1, 2, 3, 4]
    assert await offsets(before=5, limit=2) == [3, 4]
    assert await offsets(after=2, before=6, limit=100) == [3, 4, 5]
    assert await offsets(after=10, limit=100) == []
    assert await offsets(before=1, limit=100) == []
    assert await offsets(limit=0) == []


async def test_covers_after(make_window: MakeWindow) -> None:
    window, outbox = await make_window(size=5)
    await window.rebuild(CID, [], 0)
    empty = await window.read(CID, limit=10)
    assert empty is not None and empty.first_offset == 1 and empty.covers_after(0)
    await append_n(window, outbox, 12)
    view = await window.read(CID, limit=10)
    assert view is not None
    assert view.covers_after(12) and view.covers_after(7)
    assert not view.covers_after(6)  # offset 7 was trimmed away
    assert not view.covers_after(13)  # from the future: the client is on another timeline


async def test_rebuild_loads_the_store_tail_under_a_new_epoch(
    make_window: MakeWindow, new_message: MessageFactory
) -> None:
    window, outbox = await make_window(size=5)
    stored = [new_message(CID) for _ in range(8)]
    await window.rebuild(CID, stored, 8)
    view = await window.read(CID, limit=100)
    assert view is not None
    assert list(view.messages) == stored[-5:]
    assert (view.first_offset, view.last_offset) == (4, 8)
    assert (await window.append(draft(), outbox)).message.offset == 9

    epoch = view.epoch
    await window.forget(CID)
    assert await window.read(CID, limit=1) is None
    await window.rebuild(CID, stored, 8)
    rebuilt = await window.read(CID, limit=100)
    assert rebuilt is not None
    assert rebuilt.epoch != epoch
    # Offset 9 is still only in the outbox: the store's tail ends at 8, so the window holds
    # nothing rather than claim it covers 4..9, and offsets never go backwards.
    assert rebuilt.last_offset == 9
    assert rebuilt.messages == () and rebuilt.first_offset == 10
    assert not rebuilt.covers_after(8) and rebuilt.covers_after(9)
    assert (await window.append(draft(), outbox)).message.offset == 10


async def test_rebuild_keeps_an_existing_window(
    window_pair: tuple[HotWindow, Outbox], new_message: MessageFactory
) -> None:
    window, outbox = window_pair
    await window.rebuild(CID, [], 0)
    ours = await append_n(window, outbox, 3)
    first = await window.read(CID, limit=10)
    # A slower caller rebuilding from an older store snapshot must not win.
    await window.rebuild(CID, [new_message(CID)], 1)
    second = await window.read(CID, limit=10)
    assert first is not None and second is not None
    assert second.epoch == first.epoch
    assert list(second.messages) == ours and second.last_offset == 3


async def test_idempotency_survives_a_rebuild(
    window_pair: tuple[HotWindow, Outbox], new_message: MessageFactory
) -> None:
    window, outbox = window_pair
    stored = new_message(CID, user_id="u1", client_msg_id="k-old")
    await window.rebuild(CID, [stored], 1)
    result = await window.append(draft(key="k-old"), outbox)
    assert result.duplicate and result.message == stored
    fresh = await window.append(draft(key="k-new"), outbox)
    await window.forget(CID)
    await window.rebuild(CID, [stored], 1)  # the store has not caught up with "k-new" yet
    again = await window.append(draft(key="k-new"), outbox)
    assert again.duplicate and again.message == fresh.message


async def test_outbox_full_leaves_the_window_unchanged(make_window: MakeWindow) -> None:
    window, outbox = await make_window(outbox_max_entries=2)
    await window.rebuild(CID, [], 0)
    await append_n(window, outbox, 2)
    before = await window.read(CID, limit=10)
    with pytest.raises(OutboxFull):
        await window.append(draft(key="k-full"), outbox)
    after = await window.read(CID, limit=10)
    assert after == before
    # Room again: the next offset is 3 (none was burnt), and the failed key was not recorded.
    entries = await outbox.read(10, 1.0)
    await outbox.ack([e.entry_id for e in entries])
    result = await window.append(draft(key="k-full"), outbox)
    assert not result.duplicate and result.message.offset == 3


async def test_hits_and_misses_are_counted(window_pair: tuple[HotWindow, Outbox]) -> None:
    window, _ = window_pair
    assert await window.read(CID, limit=1) is None
    await window.rebuild(CID, [], 0)
    assert await window.read(CID, limit=1) is not None
    assert await window.read(CID, limit=1) is not None
    assert (window.hits, window.misses) == (2, 1)  # type: ignore[attr-defined]
