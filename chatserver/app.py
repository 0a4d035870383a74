"""The app factory: wires protocol, storage and the server parts into one aiohttp app."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence

from aiohttp import web
from redis.asyncio import Redis

from storage.batch_writer import BatchWriter, WriterLoad

from . import keys
from .agents import AgentCatalog
from .auth import authenticator
from .backends import (
    make_broker,
    make_limiter,
    make_model_guard,
    make_presence,
    make_provider,
    make_reply_buffer,
    make_reply_jobs,
    make_response_cache,
    make_store,
    make_window_and_outbox,
    open_redis,
)
from .conversations import ConversationService
from .errors import DEPENDENCY_ERRORS
from .fanout.envelope import Control, PresenceChanged
from .fanout.events import Event
from .fanout.hub import LocalHub
from .fanout.outbound import Flusher
from .fanout.publish import publish
from .generation.jobs import keep_jobs
from .generation.manager import GenerationManager
from .generation.routing import Router
from .http.admin import add_admin_routes
from .http.headers import security_headers
from .http.rest import add_routes, errors_and_metrics
from .ops.drain import drain
from .ops.maintenance import partition_maintenance
from .ops.memory import Bounded, HeapProfiler
from .ops.metrics import Metrics
from .ops.observe import observe
from .presence.tracker import PresenceTracker
from .redis_ticks import TickPipelinedRedis
from .settings import Settings
from .ws.admission import Admission
from .ws.gateway import websocket_handler
from .ws.going_away import resync_joined
from .ws.typing_gate import TypingGate

# Embedded mode: questions of the last day without an answer are answered after a restart.
_RECOVER_S = 86400.0
log = logging.getLogger("chatserver.app")


def create_app(settings: Settings, metrics: Metrics | None = None) -> web.Application:
    settings.check_dev_auth()  # before anything starts: the CLI exits 2 on it
    app = web.Application(
        middlewares=[errors_and_metrics], client_max_size=settings.server.max_body_bytes
    )
    app[keys.SETTINGS] = settings
    app[keys.LIMITS] = settings.limits
    app[keys.METRICS] = metrics if metrics is not None else Metrics()
    app[keys.AUTH] = authenticator(settings)
    app[keys.AGENTS] = AgentCatalog.load(settings.server.agents)
    app[keys.STATE] = keys.RunState()
    app[keys.FLUSHER] = Flusher()
    app[keys.ADMISSION] = Admission.of(settings.ws)
    app[keys.TYPING] = TypingGate(settings.ws.typing_interval_ms)
    app[keys.BOUNDED] = Bounded()
    app[keys.BOUNDED].watch(app[keys.METRICS])
    app[keys.HEAP] = HeapProfiler(settings.memory.tracemalloc_frames)
    app.cleanup_ctx.extend(
        [
            _heap,
            _redis,
            _storage,
            partition_maintenance,
            _persistence,
            _limits,
            _fanout,
            _presence,
            _generation,
            _scripts,
        ]
    )
    app.cleanup_ctx.append(observe)  # periodic gauges and event-loop lag, stopped first
    app.on_shutdown.append(drain)
    app.on_response_prepare.append(security_headers)
    app.router.add_get("/ws", websocket_handler)
    add_routes(app)
    add_admin_routes(app)
    if app[keys.AUTH].dev_mode:
        log.warning(
            "DEV AUTH MODE: no CHAT_JWT_SECRET set; tokens are signed with a random per-run "
            "secret and POST /api/dev/token hands them out to anyone. Never run this in production."
        )
    return app


async def _heap(app: web.Application) -> AsyncIterator[None]:
    # First: what the other parts allocate from their start on is traced (when set).
    app[keys.HEAP].start()
    yield
    app[keys.HEAP].stop()


async def _redis(app: web.Application) -> AsyncIterator[None]:
    redis = await open_redis(app[keys.SETTINGS])
    app[keys.REDIS] = redis
    if isinstance(redis, Redis):
        pool = redis.connection_pool
        # Opened as concurrency asks, kept for good: the pool's peak, up to its bound.
        app[keys.BOUNDED].add(
            lambda: {
                "redis_connections": (
                    sum(count for count, _ in pool.get_connection_count()),
                    pool.max_connections,
                )
            }
        )
    yield
    if redis is not None:
        await redis.aclose()


async def _storage(app: web.Application) -> AsyncIterator[None]:
    settings = app[keys.SETTINGS]
    store = make_store(settings)
    window, outbox = make_window_and_outbox(settings, app[keys.REDIS])
    jobs = make_reply_jobs(settings, app[keys.REDIS])
    await store.start()
    await window.start()
    await outbox.start()
    await jobs.start()
    app[keys.STORE] = store
    app[keys.WINDOW] = window
    app[keys.OUTBOX] = outbox
    app[keys.CONVERSATIONS] = ConversationService(
        store,
        window,
        outbox,
        app[keys.AGENTS],
        join_messages=settings.window.join_messages,
        limits=settings.limits,
        cache_size=settings.memory.conversation_cache,
        jobs=jobs,
    )
    app[keys.BOUNDED].watch(store, window, outbox, app[keys.CONVERSATIONS])
    if not jobs.shared:  # the previous run's questions still unanswered, its jobs gone
        recovered = jobs.recover(await store.unanswered(_RECOVER_S))
        if recovered:
            log.warning("answering %d questions left unanswered by the last run", recovered)
    yield
    await app[keys.CONVERSATIONS].cache.close()
    await jobs.close()
    await outbox.close()
    await window.close()
    await store.close()


async def _persistence(app: web.Application) -> AsyncIterator[None]:
    settings = app[keys.SETTINGS]
    metrics = app[keys.METRICS]
    outbox = app[keys.OUTBOX]

    def on_batch(size: int, seconds: float) -> None:
        metrics.batch_size.observe(size)
        metrics.batch_latency.observe(seconds)
        metrics.persisted.inc(size)

    def on_error(exc: BaseException) -> None:
        metrics.persist_errors.inc()
        log.warning("batch write failed, retrying: %s", exc)

    # Past the first, writers stand by while it keeps up alone (paced writers only).
    load = WriterLoad() if settings.persist.batch_interval_ms else None
    writers = [
        BatchWriter(
            outbox,
            app[keys.STORE],
            max_batch=settings.persist.batch_max,
            max_wait_ms=settings.persist.batch_wait_ms,
            min_interval_ms=settings.persist.batch_interval_ms,
            on_batch=on_batch,
            on_error=on_error,
            load=load,
            standby=index > 0,
        )
        for index in range(settings.effective_batch_writers)
    ]
    for writer in writers:
        writer.start()
    yield
    # Everything acked is persisted before the store closes.
    timeout_s = max(10.0, settings.server.shutdown_grace_s)
    if outbox.shared:  # the other instances' writers take what is left
        await asyncio.gather(*(w.finish(timeout_s=timeout_s) for w in writers))
    else:
        await asyncio.gather(*(w.stop(drain=True, timeout_s=timeout_s) for w in writers))


async def _fanout(app: web.Application) -> AsyncIterator[None]:
    metrics = app[keys.METRICS]

    def on_gap() -> None:
        metrics.event_stream_gaps.inc()
        resync_joined(app)

    broker = make_broker(app[keys.SETTINGS], app[keys.REDIS], on_gap=on_gap)
    hub = LocalHub(
        broker,
        on_fanout=metrics.fanout_delay.observe,
        on_member_removed=app[keys.CONVERSATIONS].forget,
        ended_kept=app[keys.SETTINGS].memory.ended_replies,
    )
    app[keys.BOUNDED].watch(hub)
    await broker.start(hub.deliver)
    app[keys.BROKER] = broker
    app[keys.HUB] = hub
    yield
    await broker.close()


async def _presence(app: web.Application) -> AsyncIterator[None]:
    settings = app[keys.SETTINGS]
    broker = app[keys.BROKER]
    metrics = app[keys.METRICS]
    tracker = PresenceTracker(
        make_presence(settings, app[keys.REDIS]),
        app[keys.HUB],
        server_id=settings.server.server_id,
        ttl_s=settings.ws.presence_ttl_s,
        interval_s=settings.ws.presence_interval_ms / 1000,
        announce=broker.announce,
        on_frame=metrics.presence_frames.inc,
    )
    app[keys.HUB].presence = tracker
    app[keys.PRESENCE] = tracker
    tracker.start()
    yield
    app[keys.HUB].presence = None
    await tracker.close()


async def _scripts(app: web.Application) -> AsyncIterator[None]:
    """Every Redis script the app registered, loaded before the first request needs it."""
    redis = app[keys.REDIS]
    if isinstance(redis, TickPipelinedRedis):
        log.info("redis scripts loaded", extra={"scripts": await redis.preload_scripts()})
    yield


async def _generation(app: web.Application) -> AsyncIterator[None]:
    settings = app[keys.SETTINGS]
    guard = make_model_guard(settings, app[keys.REDIS])  # caps on requests to each model
    provider = make_provider(settings, app[keys.METRICS], guard)  # Gemini with a key, else local
    buffer = make_reply_buffer(settings, app[keys.REDIS])
    await buffer.start()  # before serving: what an earlier run under our id left
    app[keys.REPLY_BUFFER] = buffer
    broker = app[keys.BROKER]

    async def publish_frame(conversation_id: str, frame: dict[str, object]) -> None:
        await publish(app, conversation_id, frame)

    flusher = app[keys.FLUSHER]
    cache = make_response_cache(settings, app[keys.REDIS])

    async def publish_deltas(events: Sequence[Event]) -> None:
        # The pump's batch is a loop tick's deltas, one per streaming connection: written
        # now, not after the flusher's passes, which on a busy loop are each its whole I/O.
        await broker.publish_many(events)
        flusher.flush_now()

    def deliver_deltas(events: Sequence[Event]) -> None:
        # An unwatched reply's deltas: this instance's members only, written now.
        broker.deliver_local(events)
        flusher.flush_now()

    manager = GenerationManager(
        app[keys.CONVERSATIONS],
        publish_frame,
        buffer,
        provider,
        app[keys.AGENTS],
        app[keys.METRICS],
        server_id=settings.server.server_id,
        send_control=broker.send_control,
        publish_events=publish_deltas,
        deliver_events=deliver_deltas,
        announce=broker.announce,
        router=Router(settings.replies.light_max_chars),
        cache=cache,
        on_usage=app[keys.LIMITER].add_tokens,
        max_queued=settings.replies.max_queued,
        jobs=app[keys.CONVERSATIONS].jobs,
        max_held=settings.replies.max_held,
        attempts=settings.replies.attempts,
        slot_wait_s=settings.replies.turn_wait_s,
        early_calls=settings.replies.early_calls,
    )
    presence = app[keys.PRESENCE]

    def on_control(message: Control) -> None:
        if isinstance(message, PresenceChanged):
            presence.on_control(message)
        else:
            manager.on_control(message)

    broker.on_control = on_control
    app[keys.GENERATION] = manager
    max_held = settings.replies.max_held
    app[keys.BOUNDED].watch(provider, cache)
    # Runs, lanes, held jobs and their tasks: one each per question answered or queued here.
    app[keys.BOUNDED].add(lambda: {"replies_held": (manager.pending, max_held)})
    leases = asyncio.create_task(
        manager.keep_leases(
            settings.replies.lease_s, sweep_s=min(2.0, settings.replies.lease_s / 2)
        ),
        name="reply-leases",
    )
    jobs = manager.jobs
    upkeep = None
    if jobs is not None:
        upkeep = asyncio.create_task(
            keep_jobs(manager, jobs, settings.replies.lease_s), name="reply-jobs"
        )
    yield
    leases.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await leases
    if upkeep is not None:
        upkeep.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await upkeep
    await manager.shutdown(0)
    await provider.close()
    if guard is not None:
        await guard.close()


async def _limits(app: web.Application) -> AsyncIterator[None]:
    limiter = make_limiter(app[keys.SETTINGS], app[keys.REDIS], app[keys.STORE])
    app[keys.LIMITER] = limiter
    app[keys.BOUNDED].watch(limiter)

    async def keep_connections_counted() -> None:
        # Connections count in Redis under a TTL: a dead instance's ones expire.
        while True:
            await asyncio.sleep(10)
            held = [
                (c.session.user_id, c.session.id)
                for c in app[keys.STATE].connections
                if c.counted and c.session is not None
            ]
            try:
                await limiter.renew_connections(held)
            except DEPENDENCY_ERRORS as exc:
                log.warning("connection counts not renewed: %s", exc)

    renewer = asyncio.create_task(keep_connections_counted(), name="limits-renewer")
    yield
    renewer.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await renewer
