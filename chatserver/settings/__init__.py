"""The settings: frozen sections filled from CLI flags, then ``CHAT_*`` env, then defaults.

``Settings`` holds one section per concern (``settings.redis.url``,
``settings.store.pool_max``, ...); each section validates its own fields when it is made, so
a ``Settings`` that exists is a valid one. Outside, every setting keeps one flat name: the
flag ``--<name>``, the variable ``CHAT_<NAME>``, and the keywords of :meth:`Settings.of`,
:meth:`Settings.with_overrides` and :func:`load` (``redis_url``, ``pg_pool_max``, ...).
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from protocol import Limits

from ..limits.base import TierLimits
from .declare import KIND_WORDS, PARSERS, SettingsError, env_name, strip_password
from .memory import MemorySettings
from .replies import GeminiSettings, ReplySettings
from .sections import (
    AuthSettings,
    PersistSettings,
    RedisSettings,
    ServerSettings,
    StoreSettings,
    TierSettings,
    WindowSettings,
    WsSettings,
)

__all__ = ["Settings", "SettingsError", "add_flags", "defaults", "env_name", "load"]


@dataclass(frozen=True, slots=True)
class Settings:
    server: ServerSettings = field(default_factory=ServerSettings)
    ws: WsSettings = field(default_factory=WsSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    store: StoreSettings = field(default_factory=StoreSettings)
    redis: RedisSettings = field(default_factory=RedisSettings)
    window: WindowSettings = field(default_factory=WindowSettings)
    persist: PersistSettings = field(default_factory=PersistSettings)
    tiers: TierSettings = field(default_factory=TierSettings)
    replies: ReplySettings = field(default_factory=ReplySettings)
    gemini: GeminiSettings = field(default_factory=GeminiSettings)
    memory: MemorySettings = field(default_factory=MemorySettings)

    @classmethod
    def of(cls, **flat: Any) -> Settings:
        """Settings from flat names (``Settings.of(port=0, redis_url=...)``), else defaults.

        A string value is read as the flag or variable would be (``migrate="yes"``).
        """
        return Settings().with_overrides(**flat)

    def with_overrides(self, **flat: Any) -> Settings:
        """A copy with some settings changed, named flat; each changed section is validated."""
        changes: dict[str, dict[str, Any]] = {}
        for name, value in flat.items():
            spec = SPECS.get(name)
            if spec is None:
                raise TypeError(f"no setting named {name!r}")
            changes.setdefault(spec.section, {})[spec.attr] = spec.convert(value)
        sections = {
            section: replace(getattr(self, section), **attrs) for section, attrs in changes.items()
        }
        return replace(self, **sections)

    def flat(self) -> dict[str, Any]:
        """Every setting by its flat name."""
        return {spec.name: getattr(getattr(self, spec.section), spec.attr) for spec in _specs()}

    @property
    def effective_batch_writers(self) -> int:
        """Two writers overlap one batch's Python work with the next one's database work."""
        if self.persist.batch_writers:
            return self.persist.batch_writers
        return 2 if self.store.url is not None else 1

    @property
    def dev_auth(self) -> bool:
        return self.auth.secret is None

    def check_dev_auth(self) -> None:
        """Refuse dev auth mode (tokens for anyone) where it could be reached or hold real data.

        Checked when the app is made, not by every ``Settings``: a test may build settings
        step by step, but nothing serves with them unchecked.
        """
        if not self.dev_auth or self.server.allow_dev_auth:
            return
        where = []
        if not _loopback(self.server.host):
            where.append(f"on host {self.server.host!r} (not loopback)")
        if self.store.url is not None:
            where.append("with CHAT_DATABASE_URL")
        if self.redis.url is not None:
            where.append("with CHAT_REDIS_URL")
        if where:
            raise SettingsError(
                f"dev auth mode (no CHAT_JWT_SECRET) refused {' and '.join(where)}: "
                "set CHAT_JWT_SECRET, or CHAT_ALLOW_DEV_AUTH=yes to allow it"
            )

    @property
    def limits(self) -> Limits:
        """The bounds on client input (protocol)."""
        return Limits(
            max_frame_bytes=self.ws.max_frame_bytes, max_text_chars=self.ws.max_text_chars
        )

    def tier_limits(self, tier: str) -> TierLimits:
        return self.tiers.limits(tier)

    def public_dict(self) -> dict[str, Any]:
        """Settings safe to log, by flat name: secrets masked, credentials stripped from URLs."""
        out: dict[str, Any] = {}
        for spec in _specs():
            value = getattr(getattr(self, spec.section), spec.attr)
            if spec.secret and value is not None:
                value = "***"
            elif isinstance(value, str):
                value = strip_password(value)
            out[spec.name] = value
        return out


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


@dataclass(frozen=True, slots=True)
class Spec:
    """One setting: its flat name and where it lives."""

    name: str
    section: str
    attr: str
    kind: str
    help: str
    flag: bool
    secret: bool
    default: Any

    def convert(self, value: Any) -> Any:
        if not isinstance(value, str) or self.kind == "str":
            return value
        try:
            return PARSERS[self.kind](value)
        except ValueError:
            word = KIND_WORDS.get(self.kind, self.kind)
            raise SettingsError(f"{env_name(self.name)}={value!r}: expected {word}") from None


def _specs() -> Iterator[Spec]:
    for section in fields(Settings):
        for f in fields(section.default_factory):  # type: ignore[arg-type]
            meta = f.metadata
            made = f.default_factory
            default = made() if not isinstance(made, dataclasses._MISSING_TYPE) else f.default
            yield Spec(
                meta["name"],
                section.name,
                f.name,
                meta["kind"],
                meta["help"],
                meta["flag"],
                meta["secret"],
                default,
            )


SPECS: dict[str, Spec] = {spec.name: spec for spec in _specs()}


def add_flags(parser: argparse.ArgumentParser) -> None:
    for spec in SPECS.values():
        if spec.flag:
            parser.add_argument(
                "--" + spec.name.replace("_", "-"),
                dest=spec.name,
                default=None,
                help=f"{spec.help} [{env_name(spec.name)}]",
            )


def load(
    args: argparse.Namespace | Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Build settings: flag value, else ``CHAT_<NAME>``, else the default."""
    environ = os.environ if environ is None else environ
    given = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
    values: dict[str, Any] = {}
    for name in SPECS:
        raw = given.get(name)
        if raw is None:
            raw = environ.get(env_name(name))
        if raw is not None:
            values[name] = raw
    if values.get("gemini_api_key") is None:  # the names Google's own tools read
        fallback = environ.get("GEMINI_API_KEY") or environ.get("GOOGLE_API_KEY")
        if fallback:
            values["gemini_api_key"] = fallback
    return Settings.of(**values)


def defaults() -> dict[str, Any]:
    """The value each setting takes when neither a flag nor the environment sets it, by flat
    name (``server_id`` is made per process: this is one such value)."""
    return {name: spec.default for name, spec in SPECS.items()}
