"""Prometheus metrics, on a registry injected per app (a fresh one per test)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

# Milliseconds to tens of seconds: fan-out and HTTP at the low end, replies at the top.
_LATENCY = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_REPLY = (0.05, 0.1, 0.25, 0.5, 1, 1.5, 2, 3, 5, 10, 20, 30, 60)
_BATCH = (1, 5, 10, 50, 100, 500, 1000, 5000, 10000)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.connections = Gauge(
            "chat_connections", "Open WebSocket connections", ["encoding"], registry=r
        )
        self.connects = Counter(
            "chat_connects", "WebSocket connections accepted", ["encoding"], registry=r
        )
        self.disconnects = Counter(
            "chat_disconnects", "WebSocket connections closed, by reason", ["reason"], registry=r
        )
        self.frames_in = Counter("chat_frames_in", "Client frames by type", ["type"], registry=r)
        self.frames_out = Counter(
            "chat_frames_out", "Direct server frames by type", ["type"], registry=r
        )
        self.errors = Counter("chat_errors", "Error frames sent, by code", ["code"], registry=r)
        self.fanout_delay = Histogram(
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
        self.messages_appended = Counter(
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
        self.slow_consumers = Counter(
            "chat_slow_consumers", "Connections closed for falling behind (4408)", registry=r
        )

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
