"""Prometheus metrics, on a registry injected per app (a fresh one per test)."""

from __future__ import annotations

from typing import Any, TypeVar, cast

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics import MetricWrapperBase

from protocol import ErrorCode

from .lean_metrics import LeanCounter, LeanHistogram

M = TypeVar("M", bound=MetricWrapperBase | LeanCounter | LeanHistogram)

# Milliseconds to tens of seconds: fan-out and HTTP at the low end, replies at the top.
_LATENCY = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
# Replies: 25 ms (a local model) to two minutes (a long answer); dense around 1-3 s (alerts).
_REPLY = (0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 7.5, 10, 15, 20, 30, 60, 120)
# Event-loop lag: a healthy loop is late by well under a millisecond.
_LAG = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
_BATCH = (1, 5, 10, 50, 100, 500, 1000, 5000, 10000)
# Label values come from closed sets only (frame types, codes, roles, finish reasons, the
# agents and models of the catalogue, route patterns, HTTP methods folded to seven and "other"):
# never from what a client sends. This caps the memo of children all the same.
MAX_CHILDREN = 1000


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        # Labelled children by (metric, labels): ``labels()`` takes a lock and builds a key
        # on every call, ~10 times per reply on the hot paths. Few combinations (frame
        # types, roles, agents x models x reasons), and a child is never removed.
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self.max_children = MAX_CHILDREN
        r = self.registry
        # CPU, memory, open fds and start time (Linux), the interpreter, garbage collection.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.connections = Gauge(
            "chat_connections", "Open WebSocket connections", ["encoding"], registry=r
        )
        self.connects = Counter(
            "chat_connects", "WebSocket connections accepted", ["encoding"], registry=r
        )
        self.disconnects = Counter(
            "chat_disconnects", "WebSocket connections closed, by reason", ["reason"], registry=r
        )
        # Per frame and per message: lean (lean_metrics.py), the rest prometheus_client's.
        self.frames_in = LeanCounter(
            "chat_frames_in", "Client frames by type", ["type"], registry=r
        )
        self.frames_out = LeanCounter(
            "chat_frames_out", "Direct server frames by type", ["type"], registry=r
        )
        self.errors = Counter("chat_errors", "Error frames sent, by code", ["code"], registry=r)
        for code in ErrorCode:  # every code's series exists from the start, at 0
            self.errors.labels(code.value)
        self.deliveries = Counter(
            "chat_deliveries",
            "Fan-out frames handed to this instance's joined connections",
            registry=r,
        )
        self.fanout_delay = LeanHistogram(
            "chat_fanout_delay_seconds",
            "Publish to local enqueue",
            buckets=_LATENCY,
            registry=r,
        )
        self.http_duration = Histogram(
            "chat_http_request_duration_seconds",
            "HTTP request duration",
            ["route", "method", "status"],
            buckets=_LATENCY,
            registry=r,
        )
        self.ttft = Histogram(
            "chat_reply_first_token_seconds",
            "Time from the user message to the first token",
            ["agent", "model"],
            buckets=_REPLY,
            registry=r,
        )
        self.reply_duration = Histogram(
            "chat_reply_duration_seconds",
            "Reply duration",
            ["agent", "model"],
            buckets=_REPLY,
            registry=r,
        )
        self.replies = Counter(
            "chat_replies", "Replies ended, by finish reason", ["finish_reason"], registry=r
        )
        self.tokens = Counter("chat_tokens", "Model tokens", ["model", "direction"], registry=r)
        self.active_replies = Gauge("chat_active_replies", "Replies streaming now", registry=r)
        self.replies_queued = Gauge(
            "chat_replies_queued",
            "Replies waiting here for their conversation's turn or the model",
            registry=r,
        )
        # Reply jobs (one per acknowledged question until its answer is stored).
        self.reply_jobs_queued = LeanCounter(
            "chat_reply_jobs_queued", "Reply jobs written with a question here", registry=r
        )
        self.reply_jobs_held = Gauge(
            "chat_reply_jobs_held", "Reply jobs this instance runs or queues", registry=r
        )
        self.reply_jobs_retried = Counter(
            "chat_reply_jobs_retried", "Reply attempts made again after a model error", registry=r
        )
        self.reply_jobs_claimed = Counter(
            "chat_reply_jobs_claimed", "Reply jobs taken over from a stopped instance", registry=r
        )
        self.reply_jobs_failed = Counter(
            "chat_reply_jobs_failed", "Questions answered with finish_reason error", registry=r
        )
        self.reply_jobs_outstanding = Gauge(
            "chat_reply_jobs_outstanding", "Reply jobs not done, all instances", registry=r
        )
        self.reply_jobs_oldest_age = Gauge(
            "chat_reply_jobs_oldest_age_seconds",
            "Age of the oldest reply job not done (all instances)",
            registry=r,
        )
        self.early_calls = LeanCounter(
            "chat_early_model_calls",
            "Model calls begun beside their question's append, by outcome: adopted by the "
            "reply, or cancelled (another prompt by then, a refused send, a resend)",
            ["outcome"],
            registry=r,
        )
        self.messages_appended = LeanCounter(
            "chat_messages_appended", "Messages acked (appended)", ["role"], registry=r
        )
        self.outbox_backlog = Gauge(
            "chat_outbox_backlog", "Messages waiting to be persisted", registry=r
        )
        self.batch_size = Histogram(
            "chat_persist_batch_size", "Messages per persisted batch", buckets=_BATCH, registry=r
        )
        self.batch_latency = Histogram(
            "chat_persist_batch_seconds", "Time to persist one batch", buckets=_LATENCY, registry=r
        )
        self.persisted = Counter(
            "chat_messages_persisted", "Messages written to the store", registry=r
        )
        self.persist_errors = Counter(
            "chat_persist_errors", "Failed batch writes (retried)", registry=r
        )
        self.conversations_created = Counter(
            "chat_conversations_created", "Conversations created", registry=r
        )
        self.active_users = Gauge(
            "chat_active_users", "Distinct users connected to this instance", registry=r
        )
        self.frame_duration = LeanHistogram(
            "chat_frame_handling_seconds",
            "Time to handle one client frame, by type (a send: until its ack is queued)",
            ["type"],
            buckets=_LATENCY,
            registry=r,
        )
        self.rate_limited = Counter(
            "chat_rate_limited",
            "Requests refused by a rate limit or quota, by code",
            ["code"],
            registry=r,
        )
        # Fed from the window's hit/miss counts by chatserver.ops.observe.
        self.window_hits = Counter(
            "chat_window_hits", "Hot-window reads served from the window", registry=r
        )
        self.window_misses = Counter(
            "chat_window_misses", "Hot-window reads that fell through to the store", registry=r
        )
        # Database pools (pool="primary"|"replica"), sampled by chatserver.ops.observe.
        self.db_pool_size = Gauge(
            "chat_db_pool_size", "Open database connections in the pool", ["pool"], registry=r
        )
        self.db_pool_in_use = Gauge(
            "chat_db_pool_in_use",
            "Database connections checked out of the pool",
            ["pool"],
            registry=r,
        )
        self.db_pool_max = Gauge(
            "chat_db_pool_max", "Most connections the pool may open", ["pool"], registry=r
        )
        self.loop_lag = Histogram(
            "chat_event_loop_lag_seconds",
            "How late a periodic timer fires: event-loop scheduling delay",
            buckets=_LAG,
            registry=r,
        )
        self.presence_frames = Counter(
            "chat_presence_frames", "Presence frames queued to members", registry=r
        )
        # Redis, from this instance's side (none in embedded mode).
        self.redis_up = Gauge(
            "chat_redis_up",
            "1 when the last sampled Redis round trip and the pub/sub connection were fine",
            registry=r,
        )
        self.redis_latency = Histogram(
            "chat_redis_round_trip_seconds",
            "The sampler's Redis round trip (the outbox backlog read)",
            buckets=_LATENCY,
            registry=r,
        )
        self.event_stream_gaps = Counter(
            "chat_event_stream_gaps",
            "Redis pub/sub reconnects after which joined clients were told to rejoin",
            registry=r,
        )
        self.slow_consumers = Counter(
            "chat_slow_consumers", "Connections closed for falling behind (4408)", registry=r
        )
        # Model calls: routing, the first-turn response cache, upstream failures and retries.
        self.model_routed = LeanCounter(
            "chat_model_routed",
            "Replies by the model chosen",
            ["agent", "model", "route"],
            registry=r,
        )
        self.model_cache_hits = Counter(
            "chat_model_cache_hits", "Replies served from the response cache", ["agent"], registry=r
        )
        self.model_cache_misses = Counter(
            "chat_model_cache_misses", "Cacheable replies not in the cache", ["agent"], registry=r
        )
        self.model_errors = Counter(
            "chat_model_errors",
            "Model streams ended by a failure",
            ["provider", "kind"],
            registry=r,
        )
        self.model_retries = Counter(
            "chat_model_retries", "Model requests retried (429/5xx)", ["provider"], registry=r
        )
        self.model_throttled = Counter(
            "chat_model_throttled",
            "Replies held back by the model guard: waited for it, or refused past the budget",
            ["model", "limit", "outcome"],
            registry=r,
        )
        # The in-process structures that ids keep arriving in, each bounded by a setting
        # (docs/operations.md, Memory bounds): how full, sampled by chatserver.ops.observe.
        self.bounded_size = Gauge(
            "chat_bounded_size",
            "Entries (or bytes, for a *_bytes structure) held by a bounded structure",
            ["structure"],
            registry=r,
        )
        self.bounded_limit = Gauge(
            "chat_bounded_limit", "The bound of a bounded structure", ["structure"], registry=r
        )

    def child(self, metric: M, *labels: str) -> M:
        """``metric.labels(*labels)``, remembered."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = metric.labels(*labels)
            if len(self._children) < self.max_children:
                self._children[key] = found
        return cast(M, found)

    def fill(self) -> dict[str, tuple[int, int]]:
        """Labelled children remembered by ``child`` and the bound, for the gauges."""
        return {"metric_children": (len(self._children), self.max_children)}

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
