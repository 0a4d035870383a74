"""What only the Postgres store has: both write paths, NUL texts, outages, pools, PgBouncer."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import asyncpg  # type: ignore[import-untyped]
import pytest

from chatserver.backends import make_store
from chatserver.settings import load
from protocol import Message, Usage, timestamp_from_ms
from storage import Conversation, StoreUnavailable
from storage.store.postgres import PostgresStore
from tests.services import PgBouncer, PostgresServer, free_port

T0 = 1_795_000_000_000  # 2026-11-18


def msg(cid: str, offset: int, **fields: object) -> Message:
    fields.setdefault("role", "user")
    fields.setdefault("text", f"m{offset}")
    fields.setdefault("created_at", timestamp_from_ms(T0 + offset))
    if fields["role"] == "user":
        fields.setdefault("user_id", "u1")
    return Message(id=str(uuid.uuid4()), conversation_id=cid, offset=offset, **fields)  # type: ignore[arg-type]


@pytest.fixture
async def conn(postgres_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    c = await asyncpg.connect(postgres_dsn)
    yield c
    await c.close()


@pytest.mark.parametrize("copy_threshold", [1, 1 << 30], ids=["copy", "unnest"])
async def test_both_write_paths_store_every_field_exactly(
    postgres_dsn: str, conn: asyncpg.Connection, copy_threshold: int
) -> None:
    store = PostgresStore(postgres_dsn, migrate=True, pool_min=1, copy_threshold=copy_threshold)
    await store.start()
    try:
        q = msg("c1", 1, user_id="alice", client_msg_id="k1", text="NUL \x00 in ✓ text")
        a = msg(
            "c1",
            2,
            role="assistant",
            agent_id="general",
            usage=Usage(5, 6),
            model="echo-1",
            finish_reason="length",
            reply_to=q.id,
            text="\x00",
        )
        s = msg("c1", 3, role="system", text="")
        assert await store.write_messages([q, a, s]) == 3
        assert (await store.messages_before("c1", None, 10)).messages == (q, a, s)
        assert await store.find_by_client_msg_id("c1", "alice", "k1") == q
        assert await store.usage_on("alice", "2026-11-18") == 11
        # The text column stays readable; the exact text is kept beside it.
        texts = await conn.fetch('SELECT text, text_raw FROM messages ORDER BY "offset"')
        assert texts[0]["text"] == "NUL \ufffd in ✓ text"
        assert bytes(texts[0]["text_raw"]).decode() == q.text
        assert texts[2]["text_raw"] is None
    finally:
        await store.close()


@pytest.mark.parametrize("copy_threshold", [1, 1 << 30], ids=["copy", "unnest"])
async def test_values_postgres_cannot_hold_never_block_the_writer(
    postgres_dsn: str, copy_threshold: int
) -> None:
    """NUL and lone surrogates (valid JSON escapes) in ids and texts: stored, not refused."""
    store = PostgresStore(postgres_dsn, migrate=True, pool_min=1, copy_threshold=copy_threshold)
    await store.start()
    try:
        hostile = msg("c1", 1, user_id="eve\x00", client_msg_id="k\x00\ud800", text="a\ud83d!\x00")
        reply = msg(
            "c1", 2, role="assistant", agent_id="general", usage=Usage(1, 2), reply_to=hostile.id
        )
        fine = msg("c1", 3)
        assert await store.write_messages([hostile, reply, fine]) == 3
        assert await store.write_messages([hostile, reply, fine]) == 0  # replay: still once
        stored = (await store.messages_before("c1", None, 10)).messages
        assert [m.offset for m in stored] == [1, 2, 3]
        assert stored[0].text == hostile.text  # the text itself is kept exactly
        assert stored[0].user_id == "eve\ufffd"  # ids as close as Postgres allows
        found = await store.find_by_client_msg_id("c1", "eve\x00", "k\x00\ud800")
        assert found is not None and found.id == hostile.id
        assert await store.usage_on("eve\ufffd", "2026-11-18") == 3
    finally:
        await store.close()


async def test_outage_raises_store_unavailable_then_recovers(
    postgres_dsn: str, postgres_server: PostgresServer
) -> None:
    store = PostgresStore(postgres_dsn, migrate=True, pool_min=2, command_timeout_s=5)
    await store.start()
    try:
        await store.write_messages([msg("c1", 1)])
        postgres_server.stop()  # immediate: the pooled connections die with it
        started = time.monotonic()
        for attempt in (
            store.ping(),
            store.write_messages([msg("c1", 2)]),
            store.messages_before("c1", None, 10),
            store.list_conversations("u1", None, 10),
            store.max_offset("c1"),
        ):
            with pytest.raises(StoreUnavailable):
                await attempt
        assert time.monotonic() - started < 5  # refused at once, not after a timeout
        postgres_server.start()
        # The pool reconnects by itself: the batch writer's retry just works.
        assert await store.write_messages([msg("c1", 2)]) == 1
        assert await store.max_offset("c1") == 2
    finally:
        postgres_server.start()
        await store.close()


async def test_starting_against_nothing_raises_store_unavailable() -> None:
    store = PostgresStore(f"postgresql://postgres@127.0.0.1:{free_port()}/x", command_timeout_s=2)
    with pytest.raises(StoreUnavailable):
        await store.start()


def test_settings_size_the_pools_and_select_pgbouncer_mode() -> None:
    settings = load(
        {
            "database_url": "postgresql://app@db:5432/chat",
            "read_database_url": "postgresql://app@replica:5432/chat",
            "pg_pool_min": "3",
            "pg_pool_max": "7",
            "pg_command_timeout_s": "2.5",
            "pgbouncer": "yes",
            "migrate": "yes",
            "partition_months_ahead": "5",
        },
        environ={},
    )
    store = make_store(settings)
    assert isinstance(store, PostgresStore)
    assert store.read_dsn == "postgresql://app@replica:5432/chat"
    assert (store.migrate, store.months_ahead, store.pgbouncer) == (True, 5, True)
    options = store._pool_options(store.pool_min)
    assert (options["min_size"], options["max_size"]) == (3, 7)
    assert options["command_timeout"] == 2.5
    assert options["statement_cache_size"] == 0  # no server-side prepared statement cache
    assert "jit" not in options["server_settings"]  # PgBouncer refuses unknown parameters
    direct = PostgresStore("postgresql://app@db/chat")
    assert direct._pool_options(1)["statement_cache_size"] > 0
    assert make_store(load({}, environ={})).name == "sqlite"


async def test_through_pgbouncer_many_concurrent_operations_share_few_connections(
    pgbouncer_dsn: str, pgbouncer: PgBouncer, postgres_dsn: str
) -> None:
    assert f":{pgbouncer.port}/" in pgbouncer_dsn
    store = PostgresStore(pgbouncer_dsn, migrate=True, pgbouncer=True, pool_min=2, pool_max=12)
    await store.start()
    try:

        async def one_conversation(i: int) -> None:
            cid = f"conv-{i}"
            at = timestamp_from_ms(T0)
            await store.ensure_user(f"user-{i}", "free", "user")
            await store.create_conversation(
                Conversation(cid, "general", "t", f"user-{i}", (f"user-{i}",), at, at)
            )
            for offset in range(1, 31, 10):
                batch = [msg(cid, o, user_id=f"user-{i}") for o in range(offset, offset + 10)]
                assert await store.write_messages(batch) == 10
                page = await store.messages_before(cid, None, 5)
                assert page.messages[-1].offset == offset + 9
            big = [msg(cid, o, user_id=f"user-{i}") for o in range(31, 31 + 600)]  # COPY path
            assert await store.write_messages(big) == 600
            assert await store.max_offset(cid) == 630
            listed = await store.list_conversations(f"user-{i}", None, 10)
            assert [c.id for c in listed.items] == [cid]

        # 12 client connections over PgBouncer's 3 server connections: consecutive
        # statements of one client land on different server connections.
        await asyncio.gather(*(one_conversation(i) for i in range(24)))
    finally:
        await store.close()
    direct = await asyncpg.connect(postgres_dsn)
    try:
        assert await direct.fetchval("SELECT count(*) FROM messages") == 24 * 630
    finally:
        await direct.close()


async def test_recent_authors_stay_within_their_bound_and_usage_still_charges_the_asker(
    postgres_dsn: str,
) -> None:
    """Past the bound the author of an old question is read from Postgres: the usage of its
    answer still goes to the asker (the day of T0)."""
    store = PostgresStore(postgres_dsn, migrate=True, pool_min=1, recent_authors=4)
    await store.start()
    try:
        first = msg("c1", 1, user_id="asker")
        await store.write_messages([first])
        for batch in range(5):  # 15 messages of others: the asker is forgotten
            await store.write_messages(
                [msg("c1", 2 + batch * 3 + i, user_id="other") for i in range(3)]
            )
            held, bound = store.fill()["recent_authors"]
            assert held <= bound == 8
        answer = msg(
            "c1", 20, role="assistant", agent_id="general", usage=Usage(3, 4), reply_to=first.id
        )
        await store.write_messages([answer])
        day = timestamp_from_ms(T0)[:10]
        assert await store.usage_on("asker", day) == 7
    finally:
        await store.close()


async def test_a_released_connection_sends_no_reset_and_never_stays_in_a_transaction(
    postgres_dsn: str, conn: asyncpg.Connection
) -> None:
    """asyncpg's default reset is a round trip per release; this store keeps no session
    state, so only a transaction left open is undone."""
    store = PostgresStore(postgres_dsn, migrate=True, pool_min=1, pool_max=1)
    await store.start()
    try:
        assert await store.get_conversation("no-such-conversation") is None
        last = await conn.fetch(
            "SELECT query FROM pg_stat_activity WHERE application_name = 'chatserver'"
        )
        assert len(last) == 1  # the pool's one connection
        assert "conversations" in last[0]["query"] and "RESET" not in last[0]["query"]
        async with store._primary.acquire() as held:  # an operation that failed mid-way
            await held.execute("BEGIN")
            assert held.is_in_transaction()
        async with store._primary.acquire() as held:
            assert not held.is_in_transaction()
            assert held.get_server_pid() == (
                await conn.fetchval(
                    "SELECT pid FROM pg_stat_activity WHERE application_name = 'chatserver'"
                )
            )
    finally:
        await store.close()


@pytest.mark.parametrize("pgbouncer", [False, True], ids=["direct", "pgbouncer-mode"])
async def test_a_small_batch_is_one_statement_on_postgres_directly(
    postgres_dsn: str, pgbouncer: bool
) -> None:
    """Directly, the connections start with the write settings: the insert alone is its
    transaction (one round trip). Where they cannot (PgBouncer), BEGIN, SET LOCAL, insert,
    COMMIT. A replay takes the careful way in either mode."""
    store = PostgresStore(postgres_dsn, migrate=True, pool_min=1, pool_max=1, pgbouncer=pgbouncer)
    await store.start()
    try:
        queries: list[str] = []
        async with store._primary.acquire() as held:  # the pool's one connection
            held.add_query_logger(lambda record: queries.append(record.query.strip()))
            settings = await held.fetchrow(
                "SELECT current_setting('jit') AS jit, current_setting('plan_cache_mode') AS m"
            )
        assert await store.write_messages([msg("c0", 1)]) == 1  # asyncpg learns the types
        queries.clear()
        batch = [msg("c1", 1), msg("c1", 2)]
        assert await store.write_messages(batch) == 2
        inserts = [q for q in queries if q.startswith("WITH src")]
        if pgbouncer:
            assert len(inserts) == 1 and len(queries) == 4, queries
        else:
            assert (settings["jit"], settings["m"]) == ("off", "force_custom_plan")
            assert queries == inserts and len(inserts) == 1, queries
        queries.clear()
        assert await store.write_messages([*batch, msg("c1", 3)]) == 1  # a replay: one new
        assert any("ON CONFLICT DO NOTHING" in q for q in queries)
        assert [m.offset for m in (await store.messages_before("c1", None, 10)).messages] == [
            1,
            2,
            3,
        ]
    finally:
        await store.close()
