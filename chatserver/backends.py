"""Which implementation of each interface the settings select: embedded or production."""

from __future__ import annotations

import secrets
from collections.abc import Callable

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from storage.jobs.base import ReplyJobs
from storage.jobs.memory import MemoryReplyJobs
from storage.outbox.base import Outbox
from storage.outbox.memory import MemoryOutbox
from storage.store.base import Store
from storage.store.sqlite import SqliteStore
from storage.window.base import HotWindow
from storage.window.memory import MemoryWindow

from .fanout.broker.base import Broker
from .fanout.broker.memory import MemoryBroker
from .fanout.broker.redis import RedisBroker
from .fanout.envelope import appended_head
from .generation.buffer import MemoryReplyBuffer, ReplyBuffer
from .generation.cache import MemoryResponseCache, RedisResponseCache, ResponseCache
from .generation.local import LocalProvider
from .generation.provider import Provider
from .generation.redis_buffer import RedisReplyBuffer
from .limits.base import Limiter
from .limits.memory import MemoryLimiter
from .limits.model_guard import ModelGuard
from .limits.model_guard_memory import MemoryModelGuard
from .limits.model_guard_redis import RedisModelGuard
from .limits.redis import RedisLimiter
from .ops.metrics import Metrics
from .presence.base import PresenceStore
from .presence.memory import MemoryPresence
from .presence.redis import RedisPresence
from .redis_ticks import TickPipelinedRedis
from .settings import Settings

RedisClient = Redis | RedisCluster
_CLUSTER_OUTBOX_SHARDS = 3
_MAX_CONNECTIONS = 1000  # per node; redis-py's default (100) refuses bursts of appends


def make_redis(settings: Settings) -> RedisClient | None:
    if settings.redis.url is None:
        return None
    # Ride out a Redis restart or failover of a second or two without failing requests;
    # past that the caller answers `unavailable` and clients retry.
    retry = Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), retries=6)
    errors = [RedisConnectionError, RedisTimeoutError]
    if settings.redis.cluster:
        return RedisCluster.from_url(
            settings.redis.url, retry=retry, max_connections=_MAX_CONNECTIONS
        )
    # Standalone: every command of a loop tick in one pipeline (redis_ticks.py). A cluster
    # client pipelines per node on its own terms; it keeps one command per call.
    return TickPipelinedRedis.from_url(
        settings.redis.url,
        retry=retry,
        retry_on_error=errors,
        health_check_interval=15,
        max_connections=_MAX_CONNECTIONS,
    )


async def open_redis(settings: Settings) -> RedisClient | None:
    """The Redis client, connected and answering (fail fast with a clear error when Redis is
    unreachable), or None when no Redis is configured."""
    redis = make_redis(settings)
    if isinstance(redis, RedisCluster):
        await redis.initialize()  # before many tasks share it: lazy start-up races in redis-py
    if redis is not None:
        await redis.ping()
    if isinstance(redis, TickPipelinedRedis):
        await redis.open_lane()  # the first requests ride it (redis_lane.py)
    return redis


def make_store(settings: Settings) -> Store:
    """Postgres when ``--database-url`` is set, else the embedded SQLite file."""
    if settings.store.url is not None:
        from storage.store.postgres import PostgresStore  # asyncpg only when asked for

        return PostgresStore(
            settings.store.url,
            read_dsn=settings.store.read_url,
            pool_min=settings.store.pool_min,
            pool_max=settings.store.pool_max,
            command_timeout_s=settings.store.command_timeout_s,
            pgbouncer=settings.store.pgbouncer,
            migrate=settings.store.migrate,
            months_ahead=settings.store.partition_months_ahead,
            # A reply is written a batch or two after its question: authors of that many
            # messages (two generations) spare a look-up, bounded by the batch size.
            recent_authors=max(10_000, settings.persist.batch_max),
        )
    return SqliteStore(settings.store.sqlite_path)


# This process's incarnation: the value of its alive key, set by its reply jobs and its resume
# buffer alike (one started again under the same server id is a new incarnation).
INCARNATION = secrets.token_hex(6)


def make_reply_jobs(settings: Settings, redis: RedisClient | None) -> ReplyJobs:
    """Where every acknowledged question's reply job is kept until answered."""
    if redis is None:
        return MemoryReplyJobs()
    from storage.jobs.redis import RedisReplyJobs

    return RedisReplyJobs(
        redis,
        holder=settings.server.server_id,
        prefix=settings.redis.key_prefix,
        lease_s=settings.replies.lease_s,
        cluster=settings.redis.cluster,
        incarnation=INCARNATION,
    )


def make_window_and_outbox(
    settings: Settings, redis: RedisClient | None
) -> tuple[HotWindow, Outbox]:
    if redis is None:
        memory = MemoryWindow(
            size=settings.window.size,
            idempotency_ttl_s=settings.window.idempotency_ttl_s,
            max_bytes=settings.memory.window_memory_bytes,
            max_idempotency_keys=settings.memory.idempotency_keys,
            # A tombstone per conversation whose newest messages may still be in the outbox.
            max_tombstones=settings.persist.outbox_max,
        )
        return memory, MemoryOutbox(settings.persist.outbox_max)
    from storage.outbox.redis import RedisOutbox
    from storage.window.redis import RedisWindow

    cluster = settings.redis.cluster
    server_id = settings.server.server_id

    def fanout_head(conversation_id: str, published_at: float, payload: bytes) -> bytes:
        return appended_head(server_id, published_at, conversation_id, payload)

    window = RedisWindow(
        redis,
        prefix=settings.redis.key_prefix,
        size=settings.window.size,
        idempotency_ttl_s=settings.window.idempotency_ttl_s,
        cluster=cluster,
        context_cache_bytes=settings.memory.context_cache_bytes,
        fanout_head=fanout_head,  # the broker is Redis too: a question goes out with its append
    )
    outbox = RedisOutbox(
        redis,
        prefix=settings.redis.key_prefix,
        consumer=settings.server.server_id,
        max_entries=settings.persist.outbox_max,
        claim_idle_ms=settings.persist.outbox_claim_idle_ms,
        shards=_CLUSTER_OUTBOX_SHARDS if cluster else 1,
    )
    return window, outbox


def make_broker(
    settings: Settings, redis: RedisClient | None, on_gap: Callable[[], None] | None = None
) -> Broker:
    """``on_gap``: events may have been missed (a Redis subscriber reconnected); the
    in-process broker never misses any."""
    if redis is None:
        return MemoryBroker(settings.server.server_id)
    return RedisBroker(
        redis,
        server_id=settings.server.server_id,
        prefix=settings.redis.key_prefix,
        cluster=settings.redis.cluster,
        on_gap=on_gap,
    )


def make_presence(settings: Settings, redis: RedisClient | None) -> PresenceStore:
    if redis is None:
        return MemoryPresence()
    return RedisPresence(
        redis,
        server_id=settings.server.server_id,
        ttl_s=settings.ws.presence_ttl_s,
        prefix=settings.redis.key_prefix,
    )


def make_limiter(settings: Settings, redis: RedisClient | None, store: Store) -> Limiter:
    async def seed(user_id: str, day: str) -> int:
        return await store.usage_on(user_id, day)

    if redis is None:
        return MemoryLimiter(seed, max_users=settings.memory.limiter_users)
    return RedisLimiter(redis, seed, prefix=settings.redis.key_prefix)


def make_reply_buffer(settings: Settings, redis: RedisClient | None) -> ReplyBuffer:
    if redis is None:
        return MemoryReplyBuffer()
    return RedisReplyBuffer(
        redis,
        server_id=settings.server.server_id,
        prefix=settings.redis.key_prefix,
        lease_s=settings.replies.lease_s,
        incarnation=INCARNATION,
    )


def make_model_guard(settings: Settings, redis: RedisClient | None) -> ModelGuard | None:
    """The caps on requests to each model: shared in Redis when configured, else per
    instance; none without a Gemini key (the local model costs nothing)."""
    if settings.gemini.api_key is None:
        return None
    table = settings.gemini.model_table()
    if redis is None:
        return MemoryModelGuard(table)
    return RedisModelGuard(redis, table, prefix=settings.redis.key_prefix)


def make_provider(
    settings: Settings, metrics: Metrics | None = None, guard: ModelGuard | None = None
) -> Provider:
    """Gemini when a key is configured (lean SSE or the SDK, per the setting), else the
    embedded local model (key-free)."""
    gemini = settings.gemini
    if gemini.api_key is None:
        return LocalProvider(settings.replies.local_ttft_ms, settings.replies.local_token_ms)
    from .generation.gemini import GeminiProvider
    from .generation.gemini_common import GeminiConfig, RetryPolicy

    config = GeminiConfig(
        api_key=gemini.api_key,
        base_url=gemini.base_url,
        timeout_s=gemini.timeout_s,
        retry=RetryPolicy(
            attempts=gemini.retries + 1,
            initial_s=gemini.retry_initial_s,
            max_s=gemini.retry_max_s,
            jitter_s=gemini.retry_initial_s / 4,
            budget_s=gemini.retry_budget_s,
        ),
        probe_model=gemini.probe_model,
        probe_ttl_s=gemini.check_ttl_s,
        thinking_timeout_s=gemini.thinking_timeout_s,
    )
    if gemini.transport == "sdk":
        return GeminiProvider(config, metrics, guard)
    from .generation.gemini_sse import GeminiSseProvider

    return GeminiSseProvider(config, metrics, guard)


def make_response_cache(settings: Settings, redis: RedisClient | None) -> ResponseCache | None:
    """The first-turn answer cache: shared in Redis when configured, else per instance.
    Only for a paid model: the embedded local one costs nothing to ask again."""
    if settings.replies.cache_ttl_s <= 0 or settings.gemini.api_key is None:
        return None
    if redis is None:
        return MemoryResponseCache(
            settings.replies.cache_ttl_s,
            settings.replies.cache_entries,
            max_bytes=settings.replies.cache_bytes,
        )
    return RedisResponseCache(
        redis, prefix=settings.redis.key_prefix, ttl_s=settings.replies.cache_ttl_s
    )
