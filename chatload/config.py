"""The load test's settings: one dataclass, filled from ``chatserver loadtest`` flags."""

from __future__ import annotations

import argparse
import os
import uuid
from dataclasses import asdict, dataclass, field, fields
from typing import Any
from urllib.parse import urlparse

MODES = ("idle", "chat", "ai")
DIALECTS = ("chatserver", "peer", "socketio")


class ConfigError(ValueError):
    """A load-test setting is invalid; the message names it."""


@dataclass
class LoadConfig:
    urls: list[str] = field(default_factory=lambda: ["http://127.0.0.1:8080"])
    dialect: str = "chatserver"
    encoding: str = "json"
    mode: str = "chat"
    clients: int = 100
    ramp_s: float = 2.0
    members: int = 10
    senders: int = 0  # per conversation; 0: every member sends
    rate: float = 10.0  # messages/s over the whole run; 0: flat out (each sender keeps a window)
    window: int = 1  # messages in flight per sender
    duration_s: float = 10.0
    text_bytes: int = 64
    turns: int = 0  # members == 1: a new conversation every `turns` messages (0: one, forever)
    agent_id: str = "general"
    procs: int = 1
    jwt_secret: str | None = None  # mint tokens locally; unset: ask /api/dev/token
    tier: str = "free"
    user_prefix: str = ""
    conversations_file: str | None = None  # JSON [{"id": ..., "members": [...]}]: use these
    conversation_ids: list[str] = field(default_factory=list)  # filled by the coordinator
    connect_timeout_s: float = 15.0
    ack_timeout_s: float = 15.0
    drain_timeout_s: float = 30.0
    hold_s: float = 0.0  # after the ramp, before the run: idle connections settle
    connect_concurrency: int = 200
    server_pids: list[int] = field(default_factory=list)
    aux_pids: list[int] = field(default_factory=list)  # e.g. redis-server: reported apart
    redis_urls: list[str] = field(default_factory=list)  # INFO deltas (commands, round trips)
    provider_ttft_ms: float | None = None  # to report TTFT above the provider's own
    provider_token_ms: float | None = None  # to report delta gaps above the provider's pace
    slo_p50_ms: float | None = None
    slo_p95_ms: float | None = None
    slo_p99_ms: float | None = None
    slo_ttft_p99_ms: float | None = None
    max_loss: int | None = None
    max_errors: int | None = None
    progress_s: float = 1.0
    quiet: bool = False
    out: str | None = None
    label: str = ""

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["jwt_secret"] = "***" if self.jwt_secret else None
        out["conversation_ids"] = len(self.conversation_ids)
        return out

    def wire(self) -> dict[str, Any]:
        """What a worker process needs (the secret included: it mints its own tokens)."""
        return asdict(self)

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> LoadConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @property
    def conversations(self) -> int:
        return -(-self.clients // self.members)

    @property
    def senders_per_conversation(self) -> int:
        return self.members if self.senders <= 0 else min(self.senders, self.members)

    @property
    def total_senders(self) -> int:
        """Clients that send, over every worker (the first ones of each conversation)."""
        per = self.senders_per_conversation
        return sum(1 for i in range(self.clients) if i % self.members < per)

    def user_id(self, client: int) -> str:
        return f"{self.user_prefix}{client}"

    def validate(self) -> LoadConfig:
        if self.mode not in MODES:
            raise ConfigError(f"--mode {self.mode!r}: expected one of {', '.join(MODES)}")
        if self.dialect not in DIALECTS:
            raise ConfigError(f"--dialect {self.dialect!r}: expected one of {', '.join(DIALECTS)}")
        if self.encoding not in ("json", "msgpack"):
            raise ConfigError(f"--encoding {self.encoding!r}: expected json or msgpack")
        if self.encoding == "msgpack" and self.dialect != "chatserver":
            raise ConfigError("--encoding msgpack: only the chatserver dialect speaks it")
        for name in ("clients", "members", "procs", "window"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be at least 1")
        if self.members > self.clients:
            raise ConfigError("--members cannot exceed --clients")
        if self.turns and self.members != 1:
            raise ConfigError("--turns (a new conversation every N messages) needs --members 1")
        if self.turns and self.dialect != "chatserver":
            raise ConfigError("--turns needs the chatserver dialect (it creates conversations)")
        if self.rate < 0 or self.duration_s < 0 or self.ramp_s < 0:
            raise ConfigError("--rate, --duration and --ramp cannot be negative")
        if self.text_bytes < 8:
            raise ConfigError("--text-bytes must be at least 8")
        if not self.urls:
            raise ConfigError("at least one --url")
        for url in self.urls:
            parsed = urlparse(url)
            if parsed.scheme not in ("http", "ws") or not parsed.hostname:
                raise ConfigError(f"--url {url!r}: expected http://host:port (or ws://host:port)")
        if not self.user_prefix:
            self.user_prefix = f"lt-{uuid.uuid4().hex[:8]}-"
        return self


def host_port(url: str) -> tuple[str, int]:
    parsed = urlparse(url)
    assert parsed.hostname is not None
    return parsed.hostname, parsed.port or 80


def http_base(url: str) -> str:
    host, port = host_port(url)
    return f"http://{host}:{port}"


def add_flags(parser: argparse.ArgumentParser) -> None:
    d = LoadConfig()
    add = parser.add_argument
    add(
        "--url",
        dest="urls",
        action="append",
        help="server base URL, repeat for several "
        "instances (clients spread round-robin) [http://127.0.0.1:8080]",
    )
    add("--dialect", default=d.dialect, choices=DIALECTS, help="chatserver | peer | socketio")
    add("--encoding", default=d.encoding, choices=("json", "msgpack"))
    add("--mode", default=d.mode, choices=MODES, help="idle | chat | ai")
    add("--clients", type=int, default=d.clients, help="connections (N)")
    add("--ramp", dest="ramp_s", type=float, default=d.ramp_s, help="seconds to open them all")
    add("--members", type=int, default=d.members, help="members per conversation (M)")
    add("--senders", type=int, default=d.senders, help="senders per conversation (0: all)")
    add("--rate", type=float, default=d.rate, help="messages/s in all (0: flat out)")
    add("--window", type=int, default=d.window, help="messages in flight per sender")
    add("--duration", dest="duration_s", type=float, default=d.duration_s, help="seconds")
    add("--text-bytes", type=int, default=d.text_bytes, help="size of each message's text")
    add("--turns", type=int, default=d.turns, help="a new conversation every N messages")
    add("--agent", dest="agent_id", default=d.agent_id, help="agent of created conversations")
    add("--procs", type=int, default=d.procs, help="worker processes")
    add("--tier", default=d.tier, choices=("free", "pro", "enterprise"))
    add("--user-prefix", default="", help="user ids are PREFIX<n> (default: random per run)")
    add("--conversations-file", help="JSON list of {id, members}: drive these conversations")
    add("--connect-timeout", dest="connect_timeout_s", type=float, default=d.connect_timeout_s)
    add("--drain-timeout", dest="drain_timeout_s", type=float, default=d.drain_timeout_s)
    add("--hold", dest="hold_s", type=float, default=d.hold_s, help="idle seconds after ramp")
    add(
        "--server-pid",
        dest="server_pids",
        type=int,
        action="append",
        default=[],
        help="a server process to sample CPU and memory of (repeat)",
    )
    add(
        "--aux-pid",
        dest="aux_pids",
        type=int,
        action="append",
        default=[],
        help="a helper process (e.g. redis-server) sampled and reported apart",
    )
    add(
        "--redis-info",
        dest="redis_urls",
        action="append",
        default=[],
        help="a Redis (redis://host:port) whose INFO commandstats, reads and CPU are reported "
        "over the run (repeat)",
    )
    add("--provider-ttft-ms", type=float, help="the provider's own TTFT, for 'added' figures")
    add("--provider-token-ms", type=float, help="the provider's pace, for 'added' gap figures")
    add("--slo-p50-ms", type=float, help="fail when a request p50 is above this")
    add("--slo-p95-ms", type=float, help="fail when a request p95 is above this")
    add("--slo-p99-ms", type=float, help="fail when a request or delivery p99 is above this")
    add("--slo-ttft-p99-ms", type=float, help="fail when the time-to-first-token p99 is above")
    add("--max-loss", type=int, help="fail when lost+duplicated+reordered exceed this")
    add("--max-errors", type=int, help="fail when failed connects/sends exceed this")
    add("--progress", dest="progress_s", type=float, default=d.progress_s, help="seconds")
    add("--quiet", action="store_true", help="no progress line")
    add("--out", help="write the JSON report here (default: stdout)")
    add("--label", default="", help="a name carried into the report")


def from_args(args: argparse.Namespace) -> LoadConfig:
    names = {f.name for f in fields(LoadConfig)}
    values = {k: v for k, v in vars(args).items() if k in names and v is not None}
    if not values.get("urls"):
        values.pop("urls", None)
    config = LoadConfig(**values)
    if config.jwt_secret is None and os.environ.get("CHAT_JWT_SECRET"):
        config.jwt_secret = os.environ["CHAT_JWT_SECRET"]
    return config.validate()
