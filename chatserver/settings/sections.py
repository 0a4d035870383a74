"""The sections of the settings: one frozen dataclass each, validated when it is made."""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass
from urllib.parse import urlparse

from ..limits.base import TierLimits
from .declare import (
    SettingsError,
    bad,
    default_server_id,
    env_name,
    not_negative,
    positive,
    setting,
)


@dataclass(frozen=True, slots=True)
class ServerSettings:
    host: str = setting("host", "127.0.0.1", "str", "address to listen on")
    port: int = setting("port", 8080, "int", "port to listen on (0: any free port)")
    server_id: str = setting("server_id", None, "str", "instance name", factory=default_server_id)
    log_level: str = setting("log_level", "info", "str", "debug | info | warning | error")
    agents: str | None = setting(
        "agents", None, "optional_str", "agents TOML file (default: built-in)"
    )
    allowed_origins: str = setting(
        "allowed_origins", "", "str", "comma-separated browser origins allowed on /ws (empty: any)"
    )
    max_body_bytes: int = setting("max_body_bytes", 256 * 1024, "int", "largest REST request body")
    drain_jitter_ms: int = setting(
        "drain_jitter_ms", 2000, "int", "clients told to reconnect spread over this many ms"
    )
    shutdown_grace_s: float = setting(
        "shutdown_grace_s", 10.0, "float", "time to finish replies on stop"
    )
    # aiohttp's own default is an hour, armed at connection start: a socket that sends
    # nothing, or half a request, would hold a file descriptor that long.
    http_idle_timeout_s: float = setting(
        "http_idle_timeout_s",
        75.0,
        "float",
        "close an HTTP connection idle (or mid-request) this long",
    )
    # Each round with Redis reads the outbox backlog and the reply jobs (~6 commands): an idle
    # instance's steadiest Redis traffic, and Prometheus scrapes far less often than this.
    metrics_sample_s: float = setting(
        "metrics_sample_s",
        1.0,
        "float",
        "seconds between the sampled gauges' rounds (outbox backlog, reply jobs, Redis health)",
    )
    allow_dev_auth: bool = setting(
        "allow_dev_auth",
        False,
        "bool",
        "yes: allow dev auth mode on a non-loopback host or with Postgres/Redis",
    )

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise bad(self, "port", "must be 0..65535")
        if self.log_level.lower() not in {"debug", "info", "warning", "error"}:
            raise bad(self, "log_level", "debug|info|warning|error")
        positive(self, "max_body_bytes", "http_idle_timeout_s", "metrics_sample_s")
        not_negative(self, "drain_jitter_ms", "shutdown_grace_s")

    @property
    def origins(self) -> frozenset[str]:
        return frozenset(o.strip() for o in self.allowed_origins.split(",") if o.strip())


@dataclass(frozen=True, slots=True)
class WsSettings:
    heartbeat_s: int = setting("heartbeat_s", 30, "int", "WebSocket ping interval, seconds")
    auth_timeout_s: float = setting(
        "auth_timeout_s", 5.0, "float", "time allowed for the auth frame"
    )
    max_frame_bytes: int = setting("max_frame_bytes", 64 * 1024, "int", "largest client frame")
    max_text_chars: int = setting("max_text_chars", 8000, "int", "longest message text")
    send_buffer_bytes: int = setting(
        "send_buffer_bytes", 1024 * 1024, "int", "per-connection outbound bound before 4408"
    )
    tcp_send_buffer_bytes: int = setting(
        "tcp_send_buffer_bytes",
        256 * 1024,
        "int",
        "kernel send buffer per WebSocket (0: kernel autotuning, up to MBs)",
    )
    frames_per_second: int = setting(
        "frames_per_second", 200, "int", "client frames per second per connection (burst: twice)"
    )
    bad_frame_limit: int = setting(
        "bad_frame_limit", 20, "int", "bad frames tolerated per connection per minute before 1008"
    )
    max_pending_auth: int = setting(
        "max_pending_auth", 1000, "int", "WebSockets not yet authenticated, per instance"
    )
    max_pending_auth_per_address: int = setting(
        "max_pending_auth_per_address",
        20,
        "int",
        "WebSockets not yet authenticated, per client address",
    )
    trusted_proxies: str = setting(
        "trusted_proxies",
        "",
        "str",
        "comma-separated proxy IPs whose X-Forwarded-For names the client address",
    )
    max_joined: int = setting(
        "max_joined", 100, "int", "conversations joined at once per connection"
    )
    typing_interval_ms: int = setting(
        "typing_interval_ms",
        300,
        "int",
        "at most one typing notice per user and conversation this often (0: no coalescing)",
    )
    presence_interval_ms: int = setting(
        "presence_interval_ms",
        500,
        "int",
        "presence changes of a conversation go out at most this often, coalesced",
    )
    presence_ttl_s: float = setting(
        "presence_ttl_s",
        30.0,
        "float",
        "a dead instance's users drop out of presence within this long (Redis)",
    )

    def __post_init__(self) -> None:
        positive(
            self,
            "heartbeat_s",
            "auth_timeout_s",
            "max_frame_bytes",
            "max_text_chars",
            "send_buffer_bytes",
            "frames_per_second",
            "bad_frame_limit",
            "max_pending_auth",
            "max_pending_auth_per_address",
            "max_joined",
            "presence_interval_ms",
        )
        not_negative(self, "tcp_send_buffer_bytes", "typing_interval_ms")
        if self.presence_ttl_s < 1:
            raise bad(self, "presence_ttl_s", "must be at least 1 second")
        for address in self.proxies:
            try:
                ipaddress.ip_address(address)
            except ValueError:
                raise bad(self, "trusted_proxies", "comma-separated IP addresses") from None

    @property
    def proxies(self) -> frozenset[str]:
        return frozenset(p.strip() for p in self.trusted_proxies.split(",") if p.strip())
        if self.max_frame_bytes < 1024:
            raise bad(self, "max_frame_bytes", "must be >= 1024")


@dataclass(frozen=True, slots=True)
class AuthSettings:
    secret: str | None = setting(
        "jwt_secret",
        None,
        "secret",
        "HS256 secret of client tokens; unset: dev auth mode",
        flag=False,
        secret=True,
    )
    previous_secret: str | None = setting(
        "jwt_secret_previous",
        None,
        "secret",
        "the rotated-out secret: its tokens stay valid",
        flag=False,
        secret=True,
    )
    leeway_s: int = setting("jwt_leeway_s", 30, "int", "clock skew allowed on token expiry")
    audience: str | None = setting(
        "jwt_audience", None, "optional_str", "when set, tokens must carry this aud"
    )
    issuer: str | None = setting(
        "jwt_issuer", None, "optional_str", "when set, tokens must carry this iss"
    )
    max_lifetime_s: int = setting(
        "jwt_max_lifetime_s",
        7 * 24 * 3600,
        "int",
        "longest token lifetime (exp - iat) accepted",
    )

    def __post_init__(self) -> None:
        for attr, name in (("secret", "jwt_secret"), ("previous_secret", "jwt_secret_previous")):
            value = getattr(self, attr)
            if value == "":  # set but empty: never a silent fall back to dev auth mode
                raise SettingsError(f"{env_name(name)}: set but empty (unset it for dev auth mode)")
            if value is not None and len(value.encode()) < 32:  # never echo a secret
                raise SettingsError(f"{env_name(name)}: must be at least 32 bytes (HS256 key)")
        if self.previous_secret is not None and self.secret is None:
            raise SettingsError("CHAT_JWT_SECRET_PREVIOUS needs CHAT_JWT_SECRET")
        not_negative(self, "leeway_s")
        positive(self, "max_lifetime_s")


@dataclass(frozen=True, slots=True)
class StoreSettings:
    sqlite_path: str = setting(
        "sqlite_path", "chatserver.sqlite3", "str", "SQLite file of the embedded store"
    )
    url: str | None = setting("database_url", None, "optional_str", "Postgres URL of the primary")
    read_url: str | None = setting(
        "read_database_url", None, "optional_str", "Postgres URL of a read replica"
    )
    migrate: bool = setting("migrate", False, "bool", "yes: apply Postgres migrations at start-up")
    pool_min: int = setting("pg_pool_min", 2, "int", "Postgres pool: connections kept open")
    pool_max: int = setting("pg_pool_max", 20, "int", "Postgres pool: most connections")
    command_timeout_s: float = setting(
        "pg_command_timeout_s", 10.0, "float", "Postgres: longest statement before it is abandoned"
    )
    pgbouncer: bool = setting(
        "pgbouncer",
        False,
        "bool",
        "yes: behind PgBouncer in transaction mode (no prepared statement cache)",
    )
    partition_months_ahead: int = setting(
        "partition_months_ahead", 3, "int", "monthly message partitions created ahead of now"
    )

    def __post_init__(self) -> None:
        for attr in ("url", "read_url"):
            url = getattr(self, attr)
            if url is not None and urlparse(url).scheme not in {"postgres", "postgresql"}:
                raise bad(self, attr, "not a Postgres URL")
        if self.read_url is not None and self.url is None:
            raise SettingsError("CHAT_READ_DATABASE_URL needs CHAT_DATABASE_URL (the primary)")
        positive(self, "pool_min", "pool_max", "command_timeout_s", "partition_months_ahead")
        if self.pool_min > self.pool_max:
            raise bad(self, "pool_min", "must not exceed CHAT_PG_POOL_MAX")


@dataclass(frozen=True, slots=True)
class RedisSettings:
    url: str | None = setting("redis_url", None, "optional_str", "Redis URL: enables scale-out")
    key_prefix: str = setting("redis_key_prefix", "chat", "str", "prefix of every Redis key")
    cluster: bool = setting(
        "redis_cluster", False, "bool", "yes: the Redis URL names a cluster (sharded pub/sub)"
    )

    def __post_init__(self) -> None:
        if self.url is not None and urlparse(self.url).scheme not in {"redis", "rediss", "unix"}:
            raise bad(self, "url", "not a Redis URL")
        if not self.key_prefix or "{" in self.key_prefix or "}" in self.key_prefix:
            raise bad(self, "key_prefix", "non-empty, no braces")


@dataclass(frozen=True, slots=True)
class WindowSettings:
    size: int = setting("window_size", 200, "int", "messages kept hot per conversation")
    join_messages: int = setting("join_messages", 50, "int", "messages sent with a fresh join")
    idempotency_ttl_s: int = setting(
        "idempotency_ttl_s", 24 * 3600, "int", "how long a client_msg_id is remembered"
    )

    def __post_init__(self) -> None:
        positive(self, "size", "join_messages", "idempotency_ttl_s")
        if self.join_messages > self.size:
            raise bad(self, "join_messages", "must not exceed CHAT_WINDOW_SIZE")


@dataclass(frozen=True, slots=True)
class PersistSettings:
    outbox_max: int = setting("outbox_max", 100_000, "int", "embedded outbox bound")
    outbox_claim_idle_ms: int = setting(
        "outbox_claim_idle_ms",
        30_000,
        "int",
        "outbox entries pending this long are claimed by another",
    )
    batch_max: int = setting("batch_max", 10_000, "int", "largest persistence batch")
    batch_writers: int = setting(
        "batch_writers", 0, "int", "batch writers per instance (0: 2 on Postgres, 1 on SQLite)"
    )
    batch_wait_ms: int = setting(
        "batch_wait_ms",
        1000,
        "int",
        "longest idle wait of the batch writer for its first message (it reads one at once)",
    )
    batch_interval_ms: int = setting(
        "batch_interval_ms",
        150,
        "int",
        "shortest time between the starts of one writer's batches (0: none): fewer, larger "
        "batches under load",
    )

    def __post_init__(self) -> None:
        positive(self, "outbox_max", "outbox_claim_idle_ms", "batch_max", "batch_wait_ms")
        not_negative(self, "batch_writers", "batch_interval_ms")


@functools.lru_cache(maxsize=64)
def _tier_limits(text: str, name: str) -> TierLimits:
    """Parsed once per distinct setting: every send asks (a frozen result, safe to share)."""
    return TierLimits.parse(text, name)


@dataclass(frozen=True, slots=True)
class TierSettings:
    free: str = setting(
        "limits_free",
        "messages_per_minute=20,connections=5,daily_tokens=100000,"
        "requests_per_minute=120,conversations=200,conversations_per_minute=10",
        "str",
        "free tier: messages per minute, connections, daily model tokens, REST requests per "
        "minute, conversations owned, conversations created per minute",
    )
    pro: str = setting(
        "limits_pro",
        "messages_per_minute=60,connections=20,daily_tokens=1000000,"
        "requests_per_minute=600,conversations=2000,conversations_per_minute=30",
        "str",
        "pro tier limits (same form)",
    )
    enterprise: str = setting(
        "limits_enterprise",
        "messages_per_minute=600,connections=100,daily_tokens=20000000,"
        "requests_per_minute=3000,conversations=20000,conversations_per_minute=120",
        "str",
        "enterprise tier limits (same form)",
    )

    def __post_init__(self) -> None:
        for tier in ("free", "pro", "enterprise"):
            try:
                self.limits(tier)
            except ValueError as exc:
                raise SettingsError(f"{exc} (got {getattr(self, tier)!r})") from None

    def limits(self, tier: str) -> TierLimits:
        """The limits of a tier (``free``, ``pro``, ``enterprise``)."""
        if tier not in ("free", "pro", "enterprise"):
            raise ValueError(f"unknown tier {tier!r}")
        return _tier_limits(getattr(self, tier), env_name(f"limits_{tier}"))
