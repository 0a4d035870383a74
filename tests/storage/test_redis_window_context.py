"""RedisWindow.recent, a reply's context: messages decoded once and reused while Redis holds
the same bytes (storage/window/decoded.py), within their bound in bytes."""

from __future__ import annotations

from typing import TYPE_CHECKING

from protocol import Message
from storage.outbox.memory import MemoryOutbox
from storage.records import MessageDraft
from storage.redis_keys import ConversationKeys
from storage.window.memory import MemoryWindow
from storage.window.redis import RedisWindow

from .test_redis_window import draft, make_pair

if TYPE_CHECKING:
    from conftest import RedisClients


async def test_a_context_read_decodes_only_what_is_new(redis_clients: RedisClients) -> None:
    window, outbox = await make_pair(redis_clients)
    await window.rebuild("c1", [], 0)
    for i in range(5):
        await window.append(draft(f"m{i}", cid="c1"), outbox)
    first = await window.recent("c1", 50)
    assert first is not None and window.decoded.reused == 0
    await window.append(draft("m5", cid="c1"), outbox)
    second = await window.recent("c1", 50)
    assert second is not None
    assert all(a is b for a, b in zip(first, second[:5], strict=True))  # not decoded again
    assert window.decoded.reused == 5
    view = await window.read("c1", limit=50)
    assert view is not None and second == view.messages  # what a full read decodes
    # a shorter context keeps only its own messages
    assert [m.text for m in await window.recent("c1", 2) or ()] == ["m4", "m5"]
    assert window.fill()["context_cache_bytes"][0] > 0


async def test_a_message_kept_is_never_served_for_other_bytes(
    redis_clients: RedisClients,
) -> None:
    """Redis lost the conversation and numbered new messages from 1 again: same offsets,
    other messages. The kept ones are checked against the bytes, never trusted."""
    window, outbox = await make_pair(redis_clients)
    await window.rebuild("c1", [], 0)
    for text in ("old one", "old two"):
        await window.append(draft(text, cid="c1"), outbox)
    before = await window.recent("c1", 50)
    assert before is not None and [m.offset for m in before] == [1, 2]
    keys = ConversationKeys(window.prefix, "c1")
    await window.redis.delete(keys.seq, keys.epoch, keys.win)
    await window.rebuild("c1", [], 0)
    for text in ("new one", "new two"):
        await window.append(draft(text, cid="c1"), outbox)
    after = await window.recent("c1", 50)
    assert after is not None
    assert [(m.offset, m.text) for m in after] == [(1, "new one"), (2, "new two")]
    assert {m.id for m in after}.isdisjoint(m.id for m in before)
    assert window.decoded.reused == 0


async def test_kept_messages_stay_within_their_bytes(redis_clients: RedisClients) -> None:
    window, outbox = await make_pair(redis_clients, context_cache_bytes=6_000)
    for cid in ("c1", "c2", "c3"):
        await window.rebuild(cid, [], 0)
        for i in range(2):
            await window.append(draft(f"{cid} {i}", cid=cid), outbox)
        await window.recent(cid, 50)
        held, bound = window.fill()["context_cache_bytes"]
        assert 0 < held <= bound == 6_000
    # ~1.7 KB a message: c1, read first, was dropped to make room; c3 is still kept
    await window.recent("c3", 50)
    assert window.decoded.reused == 2
    await window.recent("c1", 50)
    assert window.decoded.reused == 2
    # a context larger than the whole bound is not kept at all
    await window.rebuild("big", [], 0)
    for i in range(6):
        await window.append(draft(f"big {i}", cid="big"), outbox)
    await window.recent("big", 50)
    await window.recent("big", 50)
    assert window.decoded.reused == 2
    assert window.fill()["context_cache_bytes"][0] <= 6_000

    none_kept, _ = await make_pair(redis_clients, context_cache_bytes=0)
    assert await none_kept.recent("c3", 50) == await window.recent("c3", 50)
    assert await none_kept.recent("c3", 50) is not None
    assert none_kept.decoded.reused == 0 and none_kept.fill()["context_cache_bytes"] == (0, 0)


def test_kept_messages_stand_in_for_those_not_read_again() -> None:
    """A follow reads only what came after the newest offset kept (``since``) when the
    epoch is the one the kept messages were read under: those come first, then the new."""
    from protocol import Message
    from storage.redis_codec import message_payload
    from storage.window.decoded import DecodedMessages

    def entry(offset: int) -> tuple[int, bytes, int]:
        message = Message(f"m{offset}", "c1", offset, "user", f"text {offset}", "", user_id="u")
        return offset, message_payload(message), 1_700_000_000_000 + offset

    decoded = DecodedMessages(1 << 20)
    assert decoded.since("c1") == (0, b"")
    first = decoded.decode("c1", [entry(o) for o in range(1, 6)], epoch=b"e1", limit=4)
    assert [m.offset for m in first] == [2, 3, 4, 5]
    assert decoded.since("c1") == (5, b"e1")
    later = decoded.decode("c1", [entry(6)], epoch=b"e1", kept_through=5, limit=4)
    assert [m.offset for m in later] == [3, 4, 5, 6]
    assert all(a is b for a, b in zip(first[1:], later, strict=False))  # not decoded again
    assert decoded.since("c1") == (6, b"e1")
    unknown = decoded.decode("c2", [entry(1)])  # read without an epoch: nothing to build on
    assert len(unknown) == 1 and decoded.since("c2") == (0, b"")


async def test_a_follow_s_read_after_messages_no_longer_kept_is_left_to_the_caller(
    redis_clients: RedisClients,
) -> None:
    """A follow reads only what came after the messages kept (``context_since``); should
    the cache drop them meanwhile (its bound), the read cannot make a context: None, and
    the caller reads it whole."""
    from storage.window.decoded import DecodedMessages

    window, outbox = await make_pair(redis_clients)
    await window.rebuild("c1", [], 0)
    for i in range(3):
        await window.append(draft(f"m{i}", cid="c1"), outbox)
    keys = ConversationKeys(window.prefix, "c1")
    epoch = await window.redis.get(keys.epoch)
    newest_first = "return redis.call('XREVRANGE', KEYS[1], '+', ARGV[1])"
    whole = await window.redis.eval(newest_first, 1, keys.win, "-")
    first = window.context_of("c1", [whole, epoch, 0], 50)
    assert first is not None and [m.text for m in first] == ["m0", "m1", "m2"]
    assert window.context_since("c1") == (3, epoch)
    await window.append(draft("m3", cid="c1"), outbox)
    after = await window.redis.eval(newest_first, 1, keys.win, "(3-0")
    built = window.context_of("c1", [after, epoch, 3], 50)
    assert built is not None and [m.text for m in built] == ["m0", "m1", "m2", "m3"]
    window.decoded = DecodedMessages(window.decoded.max_bytes)  # dropped past its bound
    assert window.context_of("c1", [after, epoch, 4], 50) is None
    assert window.context_of("c1", [after, b"another epoch", 3], 50) is None


def _answer(text: str, cid: str = "c1") -> MessageDraft:
    return MessageDraft(conversation_id=cid, role="assistant", text=text, agent_id="general")


async def _follow_read(window: RedisWindow, cid: str) -> tuple[Message, ...] | None:
    """A context read as a question's follow makes it (the entries newest first, as a
    script returns them, and the epoch), through the window's ``context_of``."""
    keys = ConversationKeys(window.prefix, cid)
    entries = await window.redis.xrevrange(keys.win, count=50)
    listed = [[sid, [k for kv in fields.items() for k in kv]] for sid, fields in entries]
    return window.context_of(cid, (listed, await window.redis.get(keys.epoch), 0), 50)


async def test_an_answer_appended_here_joins_what_is_kept(redis_clients: RedisClients) -> None:
    """What a reply's context needs next is known without a read: the kept messages and the
    answer this window appended right after them, the very message a read would decode."""
    window, outbox = await make_pair(redis_clients)
    other, other_outbox = await make_pair(redis_clients)  # another instance
    await window.rebuild("c1", [], 0)
    assert window.context_kept("c1") == ()  # nothing read yet
    await window.append(draft("a question", cid="c1"), outbox)
    read = await _follow_read(window, "c1")
    assert read is not None and window.context_kept("c1") == read
    answered = await window.append(_answer("an answer"), outbox)
    kept = window.context_kept("c1")
    assert [m.text for m in kept] == ["a question", "an answer"]
    assert window.context_since("c1")[0] == answered.message.offset
    view = await window.read("c1", limit=50)
    assert view is not None and kept == view.messages  # what a read decodes
    # A user's message is not added (a question's own read brings it), and once another
    # instance's message came between, an answer after it is not added either.
    await window.append(draft("a second question", cid="c1"), outbox)
    await other.append(_answer("from elsewhere"), other_outbox)
    await window.append(_answer("a second answer"), outbox)
    assert window.context_kept("c1") == kept
    again = await _follow_read(window, "c1")
    assert again is not None and [m.text for m in again][-3:] == [
        "a second question",
        "from elsewhere",
        "a second answer",
    ]
    assert window.context_kept("c1") == again


async def test_a_window_without_follows_keeps_no_context(redis_clients: RedisClients) -> None:
    memory = MemoryWindow()
    await memory.rebuild("c1", [], 0)
    await memory.append(draft("a question", cid="c1"), MemoryOutbox())
    assert memory.context_kept("c1") == ()


def _script_entry(offset: int, text: str | None = None) -> list[object]:
    """A window entry as a follow's script returns it (stream id, fields as a list)."""
    from storage.redis_codec import TIME_MS, message_payload

    message = Message(f"m{offset}", "c1", offset, "user", text or f"text {offset}", "", user_id="u")
    ms = str(1_700_000_000_000 + offset).encode()
    return [f"{offset}-0".encode(), [b"m", message_payload(message), TIME_MS, ms]]


def _follow(offsets: list[int], after: int, text: dict[int, str] | None = None) -> list[object]:
    newest_first = [_script_entry(o, (text or {}).get(o)) for o in reversed(offsets)]
    return [newest_first, b"e1", after]


def test_a_follow_extends_what_is_kept_as_a_whole_decode_would() -> None:
    """A follow reading after the kept messages adds to them in place (a message or two a
    reply, not the whole context again): the same messages, reuse and bytes as decoding the
    whole read anew, through answers kept after the read, the limit and the bound."""
    from storage.window.decoded import DecodedMessages
    from storage.window.redis_entries import entry_fields

    def both(max_bytes: int) -> tuple[DecodedMessages, DecodedMessages]:
        fast, whole = DecodedMessages(max_bytes), DecodedMessages(max_bytes)
        for kept in (fast, whole):
            read = _follow(list(range(1, 5)), 0)[0]
            listed = [entry_fields(e) for e in reversed(read)]  # type: ignore[arg-type]
            kept.decode("c1", listed, epoch=b"e1", limit=4)
        return fast, whole

    def step(fast: DecodedMessages, whole: DecodedMessages, offsets: list[int], limit: int) -> None:
        after = fast.since("c1")[0]
        read = _follow(offsets, after)
        got = fast.followed("c1", read, limit)
        listed = [entry_fields(e) for e in reversed(read[0])]  # type: ignore[union-attr]
        want = whole.decode("c1", listed, epoch=b"e1", kept_through=after, limit=limit)
        assert got is not None and [m.offset for m in got] == [m.offset for m in want]
        assert got == want
        assert (fast.reused, fast.fill(), fast.since("c1")) == (
            whole.reused,
            whole.fill(),
            whole.since("c1"),
        )
        assert fast.kept("c1") == whole.kept("c1")

    fast, whole = both(1 << 20)
    step(fast, whole, [5], 50)  # a new question
    step(fast, whole, [6, 7], 6)  # two, past the limit: the oldest go
    answer = _script_entry(8)
    for kept in (fast, whole):  # an answer appended here, then a read from before it
        assert kept.add_next("c1", 8, answer[1][1], 1_700_000_000_008)  # type: ignore[index]
    first = fast.kept("c1")[-1]
    fast_read = fast.followed("c1", _follow([8, 9], 7), 50)
    assert fast_read is not None and fast_read[-2] is first  # the kept answer, not decoded again
    whole.decode(
        "c1",
        [entry_fields(e) for e in reversed(_follow([8, 9], 7)[0])],  # type: ignore[union-attr]
        epoch=b"e1",
        kept_through=7,
        limit=50,
    )
    assert (fast.reused, fast.fill()) == (whole.reused, whole.fill())
    # Past the bound in bytes the conversation is not kept, as a whole decode leaves it.
    probe, _ = both(1 << 20)
    fast, whole = both(probe.fill()["context_cache_bytes"][0] + 10)
    step(fast, whole, [5, 6, 7], 50)
    assert fast.since("c1") == (0, b"") and fast.fill()["context_cache_bytes"][0] == 0
    # A read not after what is kept is left to the whole decode.
    fast, whole = both(1 << 20)
    out_of_order = [[_script_entry(5), _script_entry(6)], b"e1", 4]  # oldest first: wrong way
    assert fast._extend("c1", [(6, b"", None), (5, b"", None)], b"e1", 4, 50) is None
    assert fast.followed("c1", out_of_order, 50) is not None
