"""Exactly once on Postgres: replays, duplicates, crashes between commit and ack, concurrency."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime

import asyncpg  # type: ignore[import-untyped]
import pytest

from protocol import Message, Usage, timestamp_from_ms
from storage import BatchWriter, Conversation, MemoryOutbox, StoreUnavailable
from storage.store.postgres import PostgresStore

T0 = 1_795_000_000_000  # 2026-11-18, in a monthly partition the store creates at start
PATHS = {"copy": 1, "unnest": 1 << 30}  # copy_threshold: every batch one way or the other


def exchange(cid: str, offset: int, ms: int, user: str = "alice") -> list[Message]:
    """A user message and the agent's reply to it (with usage): offsets offset, offset + 1."""
    question = Message(
        id=str(uuid.uuid4()),
        conversation_id=cid,
        offset=offset,
        role="user",
        text=f"q{offset}",
        created_at=timestamp_from_ms(T0 + ms),
        user_id=user,
        client_msg_id=uuid.uuid4().hex,
    )
    answer = Message(
        id=str(uuid.uuid4()),
        conversation_id=cid,
        offset=offset + 1,
        role="assistant",
        text=f"a{offset}",
        created_at=timestamp_from_ms(T0 + ms + 1),
        agent_id="general",
        usage=Usage(3, 4),
        reply_to=question.id,
        finish_reason="stop",
    )
    return [question, answer]


@pytest.fixture(params=sorted(PATHS))
async def store(postgres_dsn: str, request: pytest.FixtureRequest) -> AsyncIterator[PostgresStore]:
    s = PostgresStore(
        postgres_dsn, migrate=True, pool_min=1, pool_max=4, copy_threshold=PATHS[request.param]
    )
    await s.start()
    yield s
    await s.close()


@pytest.fixture
async def conn(store: PostgresStore, postgres_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    c = await asyncpg.connect(postgres_dsn)
    yield c
    await c.close()


async def stored_keys(conn: asyncpg.Connection) -> Counter[tuple[str, int]]:
    rows = await conn.fetch('SELECT conversation_id, "offset" FROM messages')
    return Counter((r[0], r[1]) for r in rows)


async def test_a_batch_written_twice_leaves_one_copy(
    store: PostgresStore, conn: asyncpg.Connection
) -> None:
    batch = [m for i in range(25) for m in exchange("c1", 2 * i + 1, 10 * i)]
    assert await store.write_messages(batch) == 50
    assert await store.write_messages(batch) == 0
    more = exchange("c1", 51, 1000)
    # Half stored, half new: only the new half counts, and only its usage is charged.
    assert await store.write_messages([*batch[-3:], *more]) == 2
    keys = await stored_keys(conn)
    assert len(keys) == 52 and set(keys.values()) == {1}
    assert await store.usage_on("alice", "2026-11-18") == 26 * 7


async def test_duplicates_inside_one_batch_are_stored_and_charged_once(
    store: PostgresStore, conn: asyncpg.Connection
) -> None:
    q, a = exchange("c1", 1, 0)
    assert await store.write_messages([q, a, a, q, a]) == 2
    assert set((await stored_keys(conn)).values()) == {1}
    assert await store.usage_on("alice", "2026-11-18") == 7


class CommitThenFail:
    """A store whose answer is lost after every ``every``-th commit, as when a writer dies
    between the commit and the ack: the batch writer must write that batch again."""

    name = "flaky"

    def __init__(self, inner: PostgresStore, every: int) -> None:
        self.inner = inner
        self.every = every
        self.calls = 0
        self.lost = 0
        self.new = 0  # what the store reported as new, over every call

    async def write_messages(self, messages: Sequence[Message]) -> int:
        self.calls += 1
        new = await self.inner.write_messages(messages)
        self.new += new
        if self.calls % self.every == 0:
            self.lost += 1
            raise StoreUnavailable("connection lost after COMMIT")
        return new

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


async def test_ten_thousand_messages_through_outbox_and_writers_each_stored_once(
    store: PostgresStore, conn: asyncpg.Connection
) -> None:
    rng = random.Random(4)
    conversations = [f"conv-{i}" for i in range(40)]
    for cid in conversations:
        await store.create_conversation(
            Conversation(cid, "general", "t", "alice", ("alice",), *[timestamp_from_ms(T0)] * 2)
        )
    offsets = dict.fromkeys(conversations, 1)
    messages: list[Message] = []
    for i in range(5_000):
        cid = rng.choice(conversations)
        messages.extend(exchange(cid, offsets[cid], 10 * i, user=f"user-{i % 7}"))
        offsets[cid] += 2
    outbox = MemoryOutbox(max_entries=20_000)
    flaky = CommitThenFail(store, every=3)
    writers = [
        BatchWriter(outbox, flaky, max_batch=700, max_wait_ms=5, backoff_initial_s=0.001)  # type: ignore[arg-type]
        for _ in range(2)
    ]
    for w in writers:
        w.start()
    for m in messages[:6_000]:
        await outbox.add(m)
    async with asyncio.timeout(30):  # both have written (and one read more than it acked)
        while True:
            if min(w.batches for w in writers) >= 1:
                break
            await asyncio.sleep(0.005)
    # An instance dies holding entries it read but never acked: they are handed out again.
    await writers[0].stop(drain=False)
    await outbox.requeue_pending()
    for m in messages[6_000:]:
        await outbox.add(m)
    writers[0].start()
    await asyncio.gather(*(w.stop(drain=True, timeout_s=60) for w in writers))

    assert await outbox.backlog() == 0
    assert flaky.lost >= 3  # some batches really were committed twice
    keys = await stored_keys(conn)
    assert len(keys) == 10_000 and set(keys.values()) == {1}
    ids = await conn.fetchval("SELECT count(DISTINCT id) FROM messages")
    assert ids == 10_000
    # Replays never count as new (a writer killed mid-batch may take its count with it).
    assert flaky.new <= 10_000
    # 5,000 replies of 7 tokens, charged once each, to the seven users who asked.
    charged = await conn.fetchval("SELECT sum(input_tokens + output_tokens) FROM usage")
    assert charged == 5_000 * 7
    for cid in conversations[:5]:
        conv = await store.get_conversation(cid)
        newest = max(m.created_at for m in messages if m.conversation_id == cid)
        assert conv is not None and conv.updated_at == newest


async def test_concurrent_writers_on_the_same_conversations_do_not_deadlock(
    store: PostgresStore, conn: asyncpg.Connection
) -> None:
    # Enough conversations that the planner updates them through the index, in the order of
    # the batch's own (hashed) conversation list, which differs between batches.
    await conn.execute(
        "INSERT INTO conversations (id, agent_id, title, owner_id, created_at, updated_at) "
        "SELECT 'c' || i, 'general', 't', 'bob', $1, $1 FROM generate_series(0, 1999) AS i",
        datetime.fromtimestamp(T0 / 1000, UTC),
    )
    await conn.execute(
        "INSERT INTO conversation_members (conversation_id, user_id, position, updated_at) "
        "SELECT id, 'bob', 1, updated_at FROM conversations"
    )
    await conn.execute("ANALYZE conversations, conversation_members")
    offsets: dict[str, int] = {}
    rng = random.Random(9)
    hot = [f"c{i}" for i in range(60)]
    deadlocks = 0

    async def writer() -> None:
        nonlocal deadlocks
        for round_no in range(25):
            batch: list[Message] = []
            for cid in rng.sample(hot, 40):
                offset = offsets.get(cid, 1)
                offsets[cid] = offset + 2
                batch.extend(exchange(cid, offset, 100 * round_no, user="bob"))
            try:
                await store.write_messages(batch)
            except StoreUnavailable as exc:
                assert isinstance(exc.__cause__, asyncpg.DeadlockDetectedError), exc
                deadlocks += 1
                await store.write_messages(batch)

    await asyncio.wait_for(asyncio.gather(writer(), writer(), writer()), timeout=60)
    assert deadlocks == 0
    assert await store.usage_on("bob", "2026-11-18") == 3 * 25 * 40 * 7
