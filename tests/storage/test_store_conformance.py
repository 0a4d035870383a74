"""One suite for every Store implementation (see ``STORE_FACTORIES`` in conftest)."""

from __future__ import annotations

import asyncio
import base64
import time
from typing import TYPE_CHECKING

import pytest

from protocol import Message, Usage, timestamp_from_ms
from storage import Conversation, Store, StoreUnavailable, User

from .conftest import STORE_OUTAGES

if TYPE_CHECKING:
    from conftest import MessageFactory, StoreMaker

T0 = 1_700_000_000_000  # 2023-11-14T22:13:20Z


def ts(ms_after_t0: int) -> str:
    return timestamp_from_ms(T0 + ms_after_t0)


def conversation(
    cid: str, *, owner: str = "u1", members: tuple[str, ...] = ("u1",), at: int = 0
) -> Conversation:
    return Conversation(
        id=cid,
        agent_id="a1",
        title=f"title of {cid}",
        owner_id=owner,
        members=members,
        created_at=ts(at),
        updated_at=ts(at),
    )


async def all_messages(store: Store, cid: str) -> tuple[Message, ...]:
    page = await store.messages_before(cid, None, 1_000_000)
    assert not page.has_more
    return page.messages


async def _answers_again(store: Store, timeout: float = 10.0) -> None:
    """Once its server is back, ping answers again (PgBouncer waits out its login retry)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            await store.ping()
            return
        except StoreUnavailable:
            if loop.time() > deadline:
                raise
        await asyncio.sleep(0.1)


async def test_ping_answers_only_while_the_store_can(
    store_maker: StoreMaker, request: pytest.FixtureRequest
) -> None:
    store = store_maker()
    await store.start()
    try:
        assert await store.ping() is None
        outage = STORE_OUTAGES.get(request.node.callspec.params["store_maker"])
        if outage is not None:  # the server goes away under a started store
            async with outage(request):
                with pytest.raises(StoreUnavailable):
                    await store.ping()
            await _answers_again(store)
    finally:
        await store.close()
    with pytest.raises(StoreUnavailable):
        await store.ping()  # closed: it cannot answer


async def test_ensure_user_is_repeatable_and_never_downgrades(store: Store) -> None:
    assert await store.get_user("u1") is None
    await store.ensure_user("u1", "pro", "admin")
    await store.ensure_user("u1", "free", "user")  # a second sign-in with a stale token
    assert await store.get_user("u1") == User("u1", "pro", "admin")
    await store.ensure_user("u2", "free", "user")
    assert await store.get_user("u2") == User("u2", "free", "user")


async def test_conversation_round_trip(store: Store) -> None:
    conv = conversation("c1", members=("u1", "u2", "u3"))
    await store.create_conversation(conv)
    assert await store.get_conversation("c1") == conv
    assert await store.get_conversation("nope") is None


async def test_conversations_are_read_together(store: Store) -> None:
    first = conversation("c1", members=("u1", "u2", "u3"))
    second = conversation("c2", owner="u2", members=("u2", "u1"))
    for made in (first, second):
        await store.create_conversation(made)
    found = await store.get_conversations(["c2", "nope", "c1", "c2"])
    assert found == {"c1": first, "c2": second}  # members in the order they were given
    assert await store.get_conversations([]) == {}
    assert await store.get_conversations(["nope"]) == {}
    many = [f"x{i}" for i in range(1200)] + ["c1"]  # past one query's bound of ids
    assert await store.get_conversations(many) == {"c1": first}


async def test_owner_is_always_a_member(store: Store) -> None:
    await store.create_conversation(conversation("c1", owner="boss", members=("u2",)))
    got = await store.get_conversation("c1")
    assert got is not None
    assert set(got.members) == {"boss", "u2"}
    page = await store.list_conversations("boss", None, 10)
    assert [c.id for c in page.items] == ["c1"]


async def test_a_member_is_removed_from_the_conversation_and_its_list(store: Store) -> None:
    await store.create_conversation(conversation("c1", owner="u1", members=("u1", "u2", "u3")))
    assert await store.remove_member("c1", "u2")
    assert not await store.remove_member("c1", "u2")  # not a member any more
    assert not await store.remove_member("nope", "u1")
    found = await store.get_conversation("c1")
    assert found is not None and found.members == ("u1", "u3")
    assert (await store.list_conversations("u2", None, 10)).items == ()
    assert [c.id for c in (await store.list_conversations("u3", None, 10)).items] == ["c1"]


async def test_owned_conversations_are_counted(store: Store) -> None:
    assert await store.count_owned_conversations("u1") == 0
    await store.create_conversation(conversation("c1", owner="u1", members=("u1", "u2")))
    await store.create_conversation(conversation("c2", owner="u1"))
    await store.create_conversation(conversation("c3", owner="u2", members=("u2", "u1")))
    await store.create_conversation(conversation("c2", owner="u1"))  # replayed: one
    assert await store.count_owned_conversations("u1") == 2  # a member of c3, not its owner
    assert await store.count_owned_conversations("u2") == 1


async def test_messages_round_trip_every_field(store: Store, new_message: MessageFactory) -> None:
    user = new_message("c1", client_msg_id="k1")
    reply = new_message(
        "c1",
        role="assistant",
        finish_reason="stop",
        usage=Usage(12, 34),
        model="echo-1",
        reply_to=user.id,
        text="héllo ✓ \x00 end",
    )
    bare = new_message("c1", role="system", text="")
    assert await store.write_messages([user, reply, bare]) == 3
    assert await all_messages(store, "c1") == (user, reply, bare)


async def test_write_empty_batch(store: Store) -> None:
    assert await store.write_messages([]) == 0


async def test_replaying_a_batch_is_harmless(store: Store, new_message: MessageFactory) -> None:
    batch = [new_message("c1") for _ in range(5)]
    assert await store.write_messages(batch) == 5
    assert await store.write_messages(batch) == 0
    extra = new_message("c1")
    # A batch that overlaps stored rows counts only the new one.
    assert await store.write_messages([*batch[3:], extra]) == 1
    assert await all_messages(store, "c1") == (*batch, extra)


async def test_updated_at_follows_newest_message(store: Store, new_message: MessageFactory) -> None:
    await store.create_conversation(conversation("c1", at=0))
    await store.create_conversation(conversation("c2", at=0))
    await store.write_messages(
        [
            new_message("c1", created_at=ts(500)),
            new_message("c1", created_at=ts(900)),
            new_message("c2", created_at=ts(700)),
        ]
    )
    c1, c2 = await store.get_conversation("c1"), await store.get_conversation("c2")
    assert c1 is not None and c1.updated_at == ts(900)
    assert c2 is not None and c2.updated_at == ts(700)
    # An older message (a late batch) never moves updated_at backwards.
    await store.write_messages([new_message("c1", created_at=ts(100))])
    c1 = await store.get_conversation("c1")
    assert c1 is not None and c1.updated_at == ts(900)
    assert c1.created_at == ts(0)


async def test_usage_goes_to_the_replied_to_user(store: Store, new_message: MessageFactory) -> None:
    day = ts(0)[:10]
    question = new_message("c1", user_id="alice", created_at=ts(0))
    answer = new_message(
        "c1", role="assistant", usage=Usage(10, 5), reply_to=question.id, created_at=ts(1)
    )
    # Replied-to message in the same batch.
    await store.write_messages([question, answer])
    assert await store.usage_on("alice", day) == 15
    # Replied-to message already stored; a reply without usage adds nothing.
    second = new_message(
        "c1", role="assistant", usage=Usage(100, 1), reply_to=question.id, created_at=ts(2)
    )
    no_usage = new_message("c1", role="assistant", reply_to=question.id, created_at=ts(3))
    await store.write_messages([second, no_usage])
    assert await store.usage_on("alice", day) == 116
    # Replays do not count twice.
    await store.write_messages([question, answer, second])
    assert await store.usage_on("alice", day) == 116
    assert await store.usage_on("u1", day) == 0
    assert await store.usage_on("alice", "1999-01-01") == 0


async def test_usage_day_is_the_utc_day_of_the_reply(
    store: Store, new_message: MessageFactory
) -> None:
    question = new_message("c1", user_id="bob", created_at="2026-03-01T23:59:59.999Z")
    answer = new_message(
        "c1",
        role="assistant",
        usage=Usage(3, 4),
        reply_to=question.id,
        created_at="2026-03-02T00:00:00.000Z",
    )
    await store.write_messages([question, answer])
    assert await store.usage_on("bob", "2026-03-02") == 7
    assert await store.usage_on("bob", "2026-03-01") == 0


async def test_messages_before_pages_backwards(store: Store, new_message: MessageFactory) -> None:
    batch = [new_message("c1") for _ in range(25)]
    await store.write_messages(batch)
    await store.write_messages([new_message("other") for _ in range(3)])

    latest = await store.messages_before("c1", None, 10)
    assert [m.offset for m in latest.messages] == list(range(16, 26))
    assert latest.has_more

    seen: list[int] = []
    before: int | None = None
    while True:
        page = await store.messages_before("c1", before, 10)
        seen = [m.offset for m in page.messages] + seen
        if not page.has_more:
            break
        before = page.messages[0].offset
    assert seen == list(range(1, 26))

    exact = await store.messages_before("c1", 11, 10)
    assert [m.offset for m in exact.messages] == list(range(1, 11))
    assert not exact.has_more
    empty = await store.messages_before("c1", 1, 10)
    assert empty.messages == () and not empty.has_more
    assert (await store.messages_before("missing", None, 10)).messages == ()


async def test_max_offset(store: Store, new_message: MessageFactory) -> None:
    assert await store.max_offset("c1") == 0
    await store.write_messages([new_message("c1") for _ in range(7)])
    await store.write_messages([new_message("c2") for _ in range(3)])
    assert await store.max_offset("c1") == 7
    assert await store.max_offset("c2") == 3


async def test_find_by_client_msg_id(store: Store, new_message: MessageFactory) -> None:
    mine = new_message("c1", user_id="u1", client_msg_id="k1")
    theirs = new_message("c1", user_id="u2", client_msg_id="k1")
    reply = new_message("c1", role="assistant", client_msg_id="g1")
    await store.write_messages([mine, theirs, new_message("c1", user_id="u1"), reply])
    assert await store.find_by_client_msg_id("c1", None, "g1") == reply  # a reply: no user
    assert await store.find_by_client_msg_id("c1", None, "k1") is None
    assert await store.find_by_client_msg_id("c1", "u1", "k1") == mine
    assert await store.find_by_client_msg_id("c1", "u2", "k1") == theirs
    assert await store.find_by_client_msg_id("c1", "u1", "k2") is None
    assert await store.find_by_client_msg_id("c2", "u1", "k1") is None


async def _seed_conversations(store: Store, new_message: MessageFactory) -> list[str]:
    """30 conversations of u1, with ties on updated_at; returns ids in expected list order."""
    expected: list[tuple[str, str]] = []
    for i in range(30):
        cid = f"c{i:02d}"
        await store.create_conversation(conversation(cid, members=("u1", "u2"), at=0))
        at = ts(1000 + (i // 3))  # groups of three share a timestamp: the id breaks the tie
        await store.write_messages([new_message(cid, created_at=at)])
        expected.append((at, cid))
    await store.create_conversation(conversation("not-mine", owner="u9", members=("u9",)))
    expected.sort(reverse=True)
    return [cid for _, cid in expected]


@pytest.mark.parametrize("limit", [1, 7, 10, 30, 31])
async def test_list_conversations_keyset_pages(
    store: Store, new_message: MessageFactory, limit: int
) -> None:
    expected = await _seed_conversations(store, new_message)
    got: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        page = await store.list_conversations("u1", cursor, limit)
        pages += 1
        assert len(page.items) <= limit
        got.extend(c.id for c in page.items)
        assert all(c.members == ("u1", "u2") for c in page.items)
        if not page.has_more:
            assert page.next_cursor is None
            break
        assert len(page.items) == limit and page.next_cursor is not None
        cursor = page.next_cursor
    assert got == expected  # same order, no duplicates, no gaps
    # The look-ahead row means an exactly full last page does not cost an extra empty one.
    assert pages == -(-len(expected) // limit)


async def test_list_conversations_pages_are_exact(
    store: Store, new_message: MessageFactory
) -> None:
    expected = await _seed_conversations(store, new_message)
    first = await store.list_conversations("u1", None, 30)
    assert [c.id for c in first.items] == expected
    assert not first.has_more and first.next_cursor is None
    assert (await store.list_conversations("nobody", None, 10)).items == ()
    mine = await store.list_conversations("u9", None, 10)
    assert [c.id for c in mine.items] == ["not-mine"]


async def test_list_conversations_reflects_new_activity(
    store: Store, new_message: MessageFactory
) -> None:
    expected = await _seed_conversations(store, new_message)
    oldest = expected[-1]
    await store.write_messages([new_message(oldest, created_at=ts(99_999))])
    page = await store.list_conversations("u1", None, 2)
    assert page.items[0].id == oldest
    assert page.items[0].updated_at == ts(99_999)


@pytest.mark.parametrize(
    "cursor",
    [
        "",
        "not a cursor!",
        "%%%",
        base64.urlsafe_b64encode(b"\xff\xfe").decode(),
        base64.urlsafe_b64encode(b"{broken json").decode(),
        base64.urlsafe_b64encode(b'{"a": 1}').decode(),
        base64.urlsafe_b64encode(b'["only one"]').decode(),
        base64.urlsafe_b64encode(b"[1, 2]").decode(),
    ],
)
async def test_invalid_cursor_raises_value_error(store: Store, cursor: str) -> None:
    with pytest.raises(ValueError):
        await store.list_conversations("u1", cursor, 10)


async def test_data_survives_close_and_reopen(
    store: Store, store_maker: StoreMaker, new_message: MessageFactory
) -> None:
    question = new_message("c1", user_id="alice", client_msg_id="k")
    answer = new_message("c1", role="assistant", usage=Usage(2, 3), reply_to=question.id)
    await store.create_conversation(conversation("c1", owner="alice", members=("alice",)))
    await store.write_messages([question, answer])
    await store.close()

    reopened = store_maker()
    await reopened.start()
    try:
        assert await all_messages(reopened, "c1") == (question, answer)
        assert await reopened.max_offset("c1") == 2
        assert await reopened.usage_on("alice", question.created_at[:10]) == 5
        assert await reopened.find_by_client_msg_id("c1", "alice", "k") == question
        page = await reopened.list_conversations("alice", None, 10)
        assert [c.id for c in page.items] == ["c1"]
        # Replay after a restart is still harmless.
        assert await reopened.write_messages([question, answer]) == 0
    finally:
        await reopened.close()


async def test_unanswered_lists_recent_questions_no_stored_message_answers(
    store: Store, new_message: MessageFactory
) -> None:
    """What a restart's reply jobs come from: in the window, user messages only, answered
    ones left out, by conversation and offset, at most ``limit``."""
    now = timestamp_from_ms(int(time.time() * 1000))
    old = new_message("c0", user_id="alice", created_at=ts(0))  # long before the window
    answered = new_message("c1", user_id="alice", created_at=now)
    waiting = new_message("c1", user_id="alice", created_at=now)
    other = new_message("c2", user_id="bob", created_at=now)
    answer = new_message("c1", role="assistant", reply_to=answered.id, created_at=now)
    await store.write_messages([other, old, answered, waiting, answer])
    assert [m.id for m in await store.unanswered(3600)] == [waiting.id, other.id]
    assert [m.id for m in await store.unanswered(3600, limit=1)] == [waiting.id]
    found = (await store.unanswered(3600))[0]
    assert (found.text, found.offset, found.user_id) == (waiting.text, waiting.offset, "alice")
