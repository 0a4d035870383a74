"""A real streaming replica: lagging reads go to it, fresh ones to the primary, and when it is
down every read is answered by the primary."""

from __future__ import annotations

import uuid

from protocol import Message, timestamp_from_ms
from storage import Conversation
from storage.store.postgres import PostgresStore
from tests.services import PostgresReplica

T0 = 1_795_000_000_000  # 2026-11-18


def conversation(cid: str, ms: int) -> Conversation:
    at = timestamp_from_ms(T0 + ms)
    return Conversation(cid, "general", "title", "u1", ("u1",), at, at)


def messages(cid: str, first: int, last: int) -> list[Message]:
    return [
        Message(
            id=str(uuid.uuid4()),
            conversation_id=cid,
            offset=o,
            role="user",
            text=f"m{o}",
            created_at=timestamp_from_ms(T0 + 1000 * o),
            user_id="u1",
        )
        for o in range(first, last + 1)
    ]


async def test_lagging_reads_use_the_replica_and_fall_back_to_the_primary(
    postgres_dsn: str, postgres_replica: PostgresReplica
) -> None:
    database = postgres_dsn.rsplit("/", 1)[1]
    store = PostgresStore(
        postgres_dsn,
        read_dsn=postgres_replica.dsn_for(database),
        migrate=True,
        pool_min=1,
        pool_max=4,
        replica_retry_s=60,
    )
    await store.start()
    try:
        await store.create_conversation(conversation("c1", 0))
        await store.write_messages(messages("c1", 1, 10))
        postgres_replica.wait_caught_up()
        async with store._replica.acquire() as conn:
            assert await conn.fetchval("SELECT pg_is_in_recovery()") is True

        # Freeze the replica: what is written now exists on the primary only.
        postgres_replica.pause_replay()
        await store.create_conversation(conversation("c2", 50_000))
        await store.write_messages(messages("c1", 11, 20))

        # Lagging reads show the frozen replica...
        listed = await store.list_conversations("u1", None, 10)
        assert [c.id for c in listed.items] == ["c1"]
        older = await store.messages_before("c1", 21, 50)
        assert [m.offset for m in older.messages] == list(range(1, 11))
        # ...reads that must be fresh see the primary.
        assert await store.get_conversation("c2") is not None
        assert await store.max_offset("c1") == 20
        latest = await store.messages_before("c1", None, 50)
        assert [m.offset for m in latest.messages] == list(range(1, 21))

        postgres_replica.resume_replay()
        postgres_replica.wait_caught_up()
        listed = await store.list_conversations("u1", None, 10)
        assert [c.id for c in listed.items] == ["c2", "c1"]  # c2 was created after c1's last
        assert len((await store.messages_before("c1", 21, 50)).messages) == 20
        assert store.replica_fallbacks == 0

        # The replica goes away: the same reads are answered by the primary.
        postgres_replica.stop()
        await store.write_messages(messages("c1", 21, 60))
        listed = await store.list_conversations("u1", None, 10)
        assert [c.id for c in listed.items] == ["c1", "c2"]  # c1 has the newest message now
        older = await store.messages_before("c1", 61, 100)
        assert [m.offset for m in older.messages] == list(range(1, 61))
        assert await store.usage_on("u1", "2026-11-18") == 0
        assert store.replica_fallbacks == 1  # then the replica is left alone for a while
    finally:
        await store.close()
