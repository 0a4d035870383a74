"""What the tests keep between runs on one machine: downloads and built images, never results.

Under ``$CHATSERVER_TEST_CACHE``, else ``$XDG_CACHE_HOME/chatserver-tests``, else
``~/.cache/chatserver-tests``. Everything in it is named by what made it (a hash, the inputs
of a build), so a stale entry is never used, only left behind; ``rm -r`` it at any time.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path


def cache_root() -> Path:
    configured = os.environ.get("CHATSERVER_TEST_CACHE")
    if configured:
        return Path(configured)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "chatserver-tests"


def cache_dir(name: str) -> Path:
    path = cache_root() / name
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (created), across processes: one builder at a time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
