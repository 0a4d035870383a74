"""One frozen settings object, filled from CLI flags, then ``CHAT_*`` env, then defaults."""

from __future__ import annotations

import argparse
import functools
import os
import socket
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any
from urllib.parse import urlparse

from protocol import Limits

from .limits.base import TierLimits


class SettingsError(ValueError):
    """A setting has a bad value; the message names the setting and the value."""


def _opt(help_text: str, *, flag: bool = True, secret: bool = False) -> dict[str, Any]:
    return {"help": help_text, "flag": flag, "secret": secret}


def _default_server_id() -> str:
    return f"{socket.gethostname()[:24]}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True, slots=True)
class Settings:
    host: str = field(default="127.0.0.1", metadata=_opt("address to listen on"))
    port: int = field(default=8080, metadata=_opt("port to listen on (0: any free port)"))
    sqlite_path: str = field(
        default="chatserver.sqlite3", metadata=_opt("SQLite file of the embedded store")
    )
    redis_url: str | None = field(default=None, metadata=_opt("Redis URL: enables scale-out"))
    database_url: str | None = field(default=None, metadata=_opt("Postgres URL of the primary"))
    read_database_url: str | None = field(
        default=None, metadata=_opt("Postgres URL of a read replica")
    )
    migrate: str = field(default="", metadata=_opt("'yes': apply Postgres migrations at start-up"))
    pg_pool_min: int = field(default=2, metadata=_opt("Postgres pool: connections kept open"))
    pg_pool_max: int = field(default=20, metadata=_opt("Postgres pool: most connections"))
    pg_command_timeout_s: float = field(
        default=10.0, metadata=_opt("Postgres: longest statement before it is abandoned")
    )
    pgbouncer: str = field(
        default="",
        metadata=_opt("'yes': behind PgBouncer in transaction mode (no prepared statement cache)"),
    )
    partition_months_ahead: int = field(
        default=3, metadata=_opt("monthly message partitions created ahead of now")
    )
    redis_key_prefix: str = field(default="chat", metadata=_opt("prefix of every Redis key"))
    redis_cluster: str = field(
        default="", metadata=_opt("'yes': the Redis URL names a cluster (sharded pub/sub)")
    )
    idempotency_ttl_s: int = field(
        default=24 * 3600, metadata=_opt("how long a client_msg_id is remembered")
    )
    reply_lease_s: float = field(
        default=5.0, metadata=_opt("lease of a running reply; renewed while it streams")
    )
    outbox_claim_idle_ms: int = field(
        default=30_000, metadata=_opt("outbox entries pending this long are claimed by another")
    )
    agents: str | None = field(default=None, metadata=_opt("agents TOML file (default: built-in)"))
    log_level: str = field(default="info", metadata=_opt("debug | info | warning | error"))
    jwt_secret: str | None = field(
        default=None,
        metadata=_opt(
            "HS256 secret of client tokens; unset: dev auth mode", flag=False, secret=True
        ),
    )
    jwt_secret_previous: str | None = field(
        default=None,
        metadata=_opt("the rotated-out secret: its tokens stay valid", flag=False, secret=True),
    )
    jwt_leeway_s: int = field(default=30, metadata=_opt("clock skew allowed on token expiry"))
    limits_free: str = field(
        default="messages_per_minute=20,connections=5,daily_tokens=100000",
        metadata=_opt("free tier: messages per minute, connections, daily model tokens"),
    )
    limits_pro: str = field(
        default="messages_per_minute=60,connections=20,daily_tokens=1000000",
        metadata=_opt("pro tier limits (same form)"),
    )
    limits_enterprise: str = field(
        default="messages_per_minute=600,connections=100,daily_tokens=20000000",
        metadata=_opt("enterprise tier limits (same form)"),
    )
    max_body_bytes: int = field(default=256 * 1024, metadata=_opt("largest REST request body"))
    drain_jitter_ms: int = field(
        default=2000, metadata=_opt("clients told to reconnect spread over this many ms")
    )
    server_id: str = field(default_factory=_default_server_id, metadata=_opt("instance name"))
    heartbeat_s: int = field(default=30, metadata=_opt("WebSocket ping interval, seconds"))
    auth_timeout_s: float = field(default=5.0, metadata=_opt("time allowed for the auth frame"))
    max_frame_bytes: int = field(default=64 * 1024, metadata=_opt("largest client frame"))
    max_text_chars: int = field(default=8000, metadata=_opt("longest message text"))
    send_buffer_bytes: int = field(
        default=1024 * 1024, metadata=_opt("per-connection outbound bound before 4408")
    )
    tcp_send_buffer_bytes: int = field(
        default=256 * 1024,
        metadata=_opt("kernel send buffer per WebSocket (0: kernel autotuning, up to MBs)"),
    )
    frames_per_second: int = field(
        default=200, metadata=_opt("client frames per second per connection (burst: twice)")
    )
    bad_frame_limit: int = field(
        default=20, metadata=_opt("bad frames tolerated per connection per minute before 1008")
    )
    window_size: int = field(default=200, metadata=_opt("messages kept hot per conversation"))
    join_messages: int = field(default=50, metadata=_opt("messages sent with a fresh join"))
    outbox_max: int = field(default=100_000, metadata=_opt("embedded outbox bound"))
    batch_max: int = field(default=10_000, metadata=_opt("largest persistence batch"))
    batch_writers: int = field(
        default=0,
        metadata=_opt("batch writers per instance (0: 2 on Postgres, 1 on SQLite)"),
    )
    batch_wait_ms: int = field(
        default=50, metadata=_opt("longest idle wait of the batch writer for its first message")
    )
    local_ttft_ms: int = field(default=150, metadata=_opt("local model: time to first token"))
    local_token_ms: int = field(default=15, metadata=_opt("local model: time per word"))
    # Gemini: with a key, replies come from Gemini (else from the local model above).
    gemini_api_key: str | None = field(
        default=None,
        metadata=_opt(
            "Gemini API key (else GEMINI_API_KEY / GOOGLE_API_KEY); unset: the local model",
            flag=False,
            secret=True,
        ),
    )
    gemini_base_url: str | None = field(
        default=None, metadata=_opt("Gemini API base URL (a proxy, a test fake); unset: Google's")
    )
    gemini_transport: str = field(
        default="sse",
        metadata=_opt("'sse': lean aiohttp SSE streaming; 'sdk': the google-genai SDK"),
    )
    gemini_timeout_s: float = field(
        default=30.0, metadata=_opt("Gemini: longest wait for the first chunk or the next one")
    )
    gemini_retries: int = field(
        default=3, metadata=_opt("Gemini: retries of a 429/5xx answer before the first chunk")
    )
    gemini_retry_initial_s: float = field(
        default=0.5, metadata=_opt("Gemini: first retry delay (doubles, plus jitter)")
    )
    gemini_retry_max_s: float = field(default=8.0, metadata=_opt("Gemini: longest retry delay"))
    gemini_probe_model: str = field(
        default="gemini-2.5-flash-lite", metadata=_opt("model the AI health check looks up")
    )
    ai_check_ttl_s: float = field(
        default=30.0, metadata=_opt("the AI health check calls the model API at most this often")
    )
    light_max_chars: int = field(
        default=200,
        metadata=_opt("routing: a first turn this short goes to the agent's light_model (0: off)"),
    )
    response_cache_ttl_s: int = field(
        default=3600, metadata=_opt("cacheable agents: first-turn answers kept this long (0: off)")
    )
    response_cache_entries: int = field(
        default=10_000, metadata=_opt("memory response cache: most answers kept (LRU)")
    )
    max_queued_replies: int = field(
        default=4, metadata=_opt("replies waiting behind a running one, per conversation")
    )
    allowed_origins: str = field(
        default="", metadata=_opt("comma-separated browser origins allowed on /ws (empty: any)")
    )
    shutdown_grace_s: float = field(default=10.0, metadata=_opt("time to finish replies on stop"))

    @property
    def effective_batch_writers(self) -> int:
        """Two writers overlap one batch's Python work with the next one's database work."""
        if self.batch_writers:
            return self.batch_writers
        return 2 if self.database_url is not None else 1

    @property
    def should_migrate(self) -> bool:
        return self.migrate.lower() in {"1", "yes", "true", "on"}

    @property
    def behind_pgbouncer(self) -> bool:
        return self.pgbouncer.lower() in {"1", "yes", "true", "on"}

    @property
    def use_redis_cluster(self) -> bool:
        return self.redis_cluster.lower() in {"1", "yes", "true", "on"}

    @property
    def dev_auth(self) -> bool:
        return self.jwt_secret is None

    @property
    def limits(self) -> Limits:
        return Limits(max_frame_bytes=self.max_frame_bytes, max_text_chars=self.max_text_chars)

    def tier_limits(self, tier: str) -> TierLimits:
        return _tier_limits(getattr(self, f"limits_{tier}"), env_name(f"limits_{tier}"))

    @property
    def origins(self) -> frozenset[str]:
        return frozenset(o.strip() for o in self.allowed_origins.split(",") if o.strip())

    def with_overrides(self, **changes: Any) -> Settings:
        return validate(replace(self, **changes))

    def public_dict(self) -> dict[str, Any]:
        """Settings safe to log: secrets masked, credentials stripped from URLs."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("secret") and value is not None:
                value = "***"
            elif isinstance(value, str) and "://" in value:
                value = _strip_password(value)
            out[f.name] = value
        return out


def _strip_password(url: str) -> str:
    parsed = urlparse(url)
    if parsed.password is None:
        return url
    return url.replace(f":{parsed.password}@", ":***@", 1)


def env_name(name: str) -> str:
    return "CHAT_" + name.upper()


def _field_kind(f: Any) -> str:
    text = str(f.type)
    if "None" in text:
        return "optional_str"
    return text.split(" ")[0]


def _convert(name: str, raw: str, kind: str) -> Any:
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
    except ValueError:
        raise SettingsError(f"{env_name(name)}={raw!r}: expected a {kind}") from None
    if kind == "optional_str":
        return raw or None
    return raw


def add_flags(parser: argparse.ArgumentParser) -> None:
    for f in fields(Settings):
        if not f.metadata.get("flag"):
            continue
        flag = "--" + f.name.replace("_", "-")
        parser.add_argument(
            flag, dest=f.name, default=None, help=f"{f.metadata['help']} [{env_name(f.name)}]"
        )


def load(
    args: argparse.Namespace | Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Build settings: flag value, else ``CHAT_<NAME>``, else the default."""
    environ = os.environ if environ is None else environ
    given = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
    values: dict[str, Any] = {}
    for f in fields(Settings):
        kind = _field_kind(f)
        raw = given.get(f.name)
        if raw is None:
            raw = environ.get(env_name(f.name))
        if raw is None:
            continue
        values[f.name] = _convert(f.name, raw, kind) if isinstance(raw, str) else raw
    for secret in ("jwt_secret", "jwt_secret_previous"):
        if secret not in values and environ.get(env_name(secret)):
            values[secret] = environ[env_name(secret)]
    if "gemini_api_key" not in values:  # the names Google's own tools read
        fallback = environ.get("GEMINI_API_KEY") or environ.get("GOOGLE_API_KEY")
        if fallback:
            values["gemini_api_key"] = fallback
    return validate(Settings(**values))


def _positive(settings: Settings, names: Sequence[str]) -> None:
    for name in names:
        value = getattr(settings, name)
        if value <= 0:
            raise SettingsError(f"{env_name(name)}={value!r}: must be > 0")


def validate(settings: Settings) -> Settings:
    if not 0 <= settings.port <= 65535:
        raise SettingsError(f"CHAT_PORT={settings.port!r}: must be 0..65535")
    _positive(
        settings,
        (
            "heartbeat_s",
            "auth_timeout_s",
            "max_frame_bytes",
            "max_text_chars",
            "send_buffer_bytes",
            "bad_frame_limit",
            "frames_per_second",
            "window_size",
            "join_messages",
            "outbox_max",
            "batch_max",
            "batch_wait_ms",
            "max_queued_replies",
            "pg_pool_min",
            "pg_pool_max",
            "pg_command_timeout_s",
            "partition_months_ahead",
            "idempotency_ttl_s",
            "reply_lease_s",
            "outbox_claim_idle_ms",
            "max_body_bytes",
        ),
    )
    for name in (
        "local_ttft_ms",
        "local_token_ms",
        "shutdown_grace_s",
        "tcp_send_buffer_bytes",
        "jwt_leeway_s",
        "drain_jitter_ms",
        "batch_writers",
    ):
        if getattr(settings, name) < 0:
            raise SettingsError(f"{env_name(name)}={getattr(settings, name)!r}: must be >= 0")
    if settings.log_level.lower() not in {"debug", "info", "warning", "error"}:
        raise SettingsError(f"CHAT_LOG_LEVEL={settings.log_level!r}: debug|info|warning|error")
    if settings.join_messages > settings.window_size:
        raise SettingsError(
            f"CHAT_JOIN_MESSAGES={settings.join_messages!r}: must not exceed CHAT_WINDOW_SIZE"
        )
    if settings.redis_url is not None and urlparse(settings.redis_url).scheme not in {
        "redis",
        "rediss",
        "unix",
    }:
        raise SettingsError(
            f"CHAT_REDIS_URL={_strip_password(settings.redis_url)!r}: not a Redis URL"
        )
    for name in ("database_url", "read_database_url"):
        url = getattr(settings, name)
        if url is not None and urlparse(url).scheme not in {"postgres", "postgresql"}:
            raise SettingsError(f"{env_name(name)}={_strip_password(url)!r}: not a Postgres URL")
    if settings.pg_pool_min > settings.pg_pool_max:
        raise SettingsError(
            f"CHAT_PG_POOL_MIN={settings.pg_pool_min!r}: must not exceed CHAT_PG_POOL_MAX"
        )
    if settings.read_database_url is not None and settings.database_url is None:
        raise SettingsError("CHAT_READ_DATABASE_URL needs CHAT_DATABASE_URL (the primary)")
    if not settings.redis_key_prefix or "{" in settings.redis_key_prefix:
        raise SettingsError(
            f"CHAT_REDIS_KEY_PREFIX={settings.redis_key_prefix!r}: non-empty, no braces"
        )
    for name in ("jwt_secret", "jwt_secret_previous"):
        secret = getattr(settings, name)
        if secret is not None and len(secret.encode()) < 32:
            raise SettingsError(f"{env_name(name)}: must be at least 32 bytes (HS256 key length)")
    if settings.jwt_secret_previous is not None and settings.jwt_secret is None:
        raise SettingsError("CHAT_JWT_SECRET_PREVIOUS needs CHAT_JWT_SECRET")
    for tier in ("free", "pro", "enterprise"):
        try:
            settings.tier_limits(tier)
        except ValueError as exc:
            raise SettingsError(f"{exc} (got {getattr(settings, f'limits_{tier}')!r})") from None
    if settings.max_frame_bytes < 1024:
        raise SettingsError(f"CHAT_MAX_FRAME_BYTES={settings.max_frame_bytes!r}: must be >= 1024")
    _validate_gemini(settings)
    return settings


def _validate_gemini(settings: Settings) -> None:
    if settings.gemini_transport not in {"sse", "sdk"}:
        raise SettingsError(f"CHAT_GEMINI_TRANSPORT={settings.gemini_transport!r}: sse|sdk")
    url = settings.gemini_base_url
    if url is not None and urlparse(url).scheme not in {"http", "https"}:
        raise SettingsError(f"CHAT_GEMINI_BASE_URL={_strip_password(url)!r}: not an http(s) URL")
    _positive(
        settings,
        (
            "gemini_timeout_s",
            "gemini_retry_initial_s",
            "gemini_retry_max_s",
            "ai_check_ttl_s",
            "response_cache_entries",
        ),
    )
    if not 0 <= settings.gemini_retries <= 10:
        raise SettingsError(f"CHAT_GEMINI_RETRIES={settings.gemini_retries!r}: must be 0..10")
    for name in ("light_max_chars", "response_cache_ttl_s"):
        if getattr(settings, name) < 0:
            raise SettingsError(f"{env_name(name)}={getattr(settings, name)!r}: must be >= 0")


def defaults() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in fields(Settings):
        if f.default is not MISSING:
            out[f.name] = f.default
    return out


@functools.lru_cache(maxsize=64)
def _tier_limits(text: str, name: str) -> TierLimits:
    """Parsed once per distinct setting: every send asks (a frozen result, safe to share)."""
    return TierLimits.parse(text, name)
