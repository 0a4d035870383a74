"""Random (version 4) UUID strings without a system call per id, and name-based
(version 5) ones without building ``uuid.UUID`` objects (one per message on the hot path).

``str(uuid.uuid4())`` asks the kernel for 16 bytes every time (``getrandom``), and the
call releases the GIL: with another thread busy (the SQLite writer) the loop may wait a
whole switch interval to get it back. A reply makes three ids (its generation and two
messages), so they come from a pool of kernel random bytes refilled every 256 ids instead:
the same source, the same format (``uuid.UUID(bytes=..., version=4)`` gives the same
string, a test holds it so).
"""

from __future__ import annotations

import hashlib
import os
import threading

_POOL = 16 * 256
_VARIANT = "89ab89ab89ab89ab"  # RFC 4122 variant: the top two bits of byte 8 are 10

_lock = threading.Lock()
_pool = b""
_pos = _POOL


def _reset() -> None:
    """A forked child must not hand out its parent's remaining bytes again."""
    global _pool, _pos
    _pool, _pos = b"", _POOL


os.register_at_fork(after_in_child=_reset)


def random_bytes16() -> bytes:
    global _pool, _pos
    with _lock:
        if _pos >= _POOL:
            _pool, _pos = os.urandom(_POOL), 0
        start = _pos
        _pos = start + 16
        return _pool[start : start + 16]


def uuid4_str() -> str:
    """A random UUID (version 4) as its canonical 36-character string."""
    return format_uuid4(random_bytes16())


def format_uuid4(raw: bytes) -> str:
    """``str(uuid.UUID(bytes=raw, version=4))``: version and variant bits forced."""
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT[int(h[16], 16)]}{h[17:20]}-{h[20:]}"


def uuid5_str(namespace: bytes, name: str) -> str:
    """``str(uuid.uuid5(uuid.UUID(bytes=namespace), name))``."""
    h = hashlib.sha1(namespace + name.encode()).hexdigest()
    return f"{h[:8]}-{h[8:12]}-5{h[13:16]}-{_VARIANT[int(h[16], 16)]}{h[17:20]}-{h[20:32]}"
