"""How a setting is declared, read from a string and checked.

Every field of a section carries in its metadata the setting's flat ``name`` (the CLI flag is
``--<name with dashes>``, the environment variable ``CHAT_<NAME>``), how a string becomes its
value (``kind``: int, float, str, optional_str, secret or bool; written out, never guessed from
the annotation), its help text, whether it has a flag, and whether it is a secret.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable
from dataclasses import field, fields
from typing import Any
from urllib.parse import urlparse


class SettingsError(ValueError):
    """A setting has a bad value; the message names the setting and the value."""


def env_name(name: str) -> str:
    return "CHAT_" + name.upper()


_TRUE = frozenset({"1", "yes", "true", "on"})
_FALSE = frozenset({"", "0", "no", "false", "off"})


def _bool(raw: str) -> bool:
    word = raw.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ValueError(raw)


PARSERS: dict[str, Callable[[str], Any]] = {
    "int": int,
    "float": float,
    "str": str,
    "optional_str": lambda raw: raw or None,
    # Unset is None, but set-and-empty stays "" so that its section refuses it: an empty
    # CHAT_JWT_SECRET must not quietly mean "no secret" (dev auth mode).
    "secret": str,
    "bool": _bool,
}
KIND_WORDS = {"bool": "yes or no", "int": "an int", "float": "a float"}


def setting(
    name: str,
    default: Any,
    kind: str,
    help_text: str,
    *,
    flag: bool = True,
    secret: bool = False,
    factory: Callable[[], Any] | None = None,
) -> Any:
    meta = {"name": name, "kind": kind, "help": help_text, "flag": flag, "secret": secret}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def bad(section: object, attr: str, rule: str) -> SettingsError:
    meta = next(f.metadata for f in fields(section) if f.name == attr)  # type: ignore[arg-type]
    value = getattr(section, attr)
    shown = strip_password(value) if isinstance(value, str) else value
    return SettingsError(f"{env_name(meta['name'])}={shown!r}: {rule}")


def positive(section: object, *attrs: str) -> None:
    for attr in attrs:
        if getattr(section, attr) <= 0:
            raise bad(section, attr, "must be > 0")


def not_negative(section: object, *attrs: str) -> None:
    for attr in attrs:
        if getattr(section, attr) < 0:
            raise bad(section, attr, "must be >= 0")


def strip_password(url: str) -> str:
    parsed = urlparse(url) if "://" in url else None
    if parsed is None or parsed.password is None:
        return url
    return url.replace(f":{parsed.password}@", ":***@", 1)


def default_server_id() -> str:
    return f"{socket.gethostname()[:24]}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
