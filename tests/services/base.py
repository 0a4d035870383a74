"""What every throwaway server of the tests shares: the error, free ports, temp dirs,
log tails, and children that die with the test process."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
_START_ATTEMPTS = 5  # a free port can be taken by someone else before the server binds it


def installed(name: str, fallback: str) -> str | None:
    """The program ``name`` on PATH, else at ``fallback`` if executable there; else None."""
    return shutil.which(name) or (fallback if os.access(fallback, os.X_OK) else None)


class ServiceError(RuntimeError):
    """A test service is missing or did not start; the message says what to do."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class _OnAPort(Protocol):
    port: int


def start_on_a_free_port(server: _OnAPort, spawn: Callable[[], None]) -> None:
    """``spawn()`` with ``server.port`` set to a free port; again on another one when it
    fails (someone may take the port between the look and the bind)."""
    last: ServiceError | None = None
    for _ in range(_START_ATTEMPTS):
        server.port = free_port()
        try:
            spawn()
            return
        except ServiceError as exc:
            last = exc
    server.port = 0
    assert last is not None
    raise last


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def _temp_base() -> str:
    """A temp root that the ``postgres`` user can traverse when we are root."""
    base = tempfile.gettempdir()
    if os.geteuid() != 0:
        return base
    path = Path(base).resolve()
    for part in (path, *path.parents):
        if not part.stat().st_mode & stat.S_IXOTH:
            return "/tmp"
    return base


def _die_with_parent() -> None:
    """In the child before exec: get SIGKILL when the test process dies (Linux only)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
