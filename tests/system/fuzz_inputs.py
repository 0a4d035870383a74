"""Hostile inputs for the live fuzzer: REST bodies, query strings (cursors), MessagePack frames.

Each generator is seeded and bounded: the same inputs every run, a fixed count. The
hand-written cases are the ones issue 20 found (a cursor of 3,000 nested ``[``, a body nested
5,000 deep, lone surrogates, NUL, ~1,000 nested array32 headers); the random ones around them
are the kind of thing a client gets wrong.
"""

from __future__ import annotations

import base64
import json
import random
from collections.abc import Iterator
from typing import Any

import msgpack

REST_RANDOM = 60  # random bodies per seed, plus the hand-written ones
QUERY_RANDOM = 40
FRAMES_RANDOM = 60

_ODD_TEXT = ["", "\x00", "a\x00b", "\x07bell", "\ud800", "x\udfff", "\u202e", "é" * 70, "ok"]


def _text(rng: random.Random) -> str:
    if rng.random() < 0.5:
        return rng.choice(_ODD_TEXT)
    return "".join(
        chr(rng.choice([rng.randrange(0x20), rng.randrange(0x110000)])) for _ in range(8)
    )


def _value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(8 if depth < 3 else 5)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False, 0, -1, 2**64, 1e308, -0.0])
    if kind in (2, 3, 4):
        return _text(rng)
    if kind in (5, 6):
        return [_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {_text(rng): _value(rng, depth + 1) for _ in range(rng.randrange(4))}


def _json(value: Any) -> bytes:
    # ensure_ascii writes a lone surrogate as \\ud800: valid JSON text, an invalid string
    return json.dumps(value, ensure_ascii=True).encode()


def rest_bodies(seed: int) -> Iterator[bytes]:
    """Bodies for POST /api/conversations."""
    rng = random.Random(seed)
    yield b"[" * 5000
    yield b'{"title":' * 3000
    yield b'{"agent_id": "general", "title": "\xff\xfe"}'  # not UTF-8
    yield b""
    yield b"null"
    yield b"1e999999"
    yield rng.randbytes(200)
    yield _json({"agent_id": "general", "title": "a\x00b"})
    yield _json({"agent_id": "general", "title": "\ud800"})
    yield _json({"agent_id": "general", "members": ["bob\x00"]})
    yield _json({"agent_id": "general", "members": [f"m{i}" for i in range(500)]})
    yield _json({"agent_id": "general", "title": "x" * 300_000})  # past the body bound
    for _ in range(REST_RANDOM):
        body = {"agent_id": rng.choice(["general", _value(rng)])}
        for name in rng.sample(["title", "members", "agent_id", "extra"], rng.randrange(4)):
            body[name] = _value(rng)
        yield _json(body) if rng.random() < 0.9 else _json(_value(rng))


def _cursor(rng: random.Random) -> str:
    kind = rng.randrange(5)
    if kind == 0:
        return base64.urlsafe_b64encode(_json(_value(rng))).decode()
    if kind == 1:
        inner = _json([rng.choice(["2026-01-01T00:00:00Z", _value(rng)]), _value(rng)])
        return base64.urlsafe_b64encode(inner).decode().rstrip("=")
    if kind == 2:
        return _text(rng)
    if kind == 3:
        return "A" * rng.choice([511, 512, 513, 4000])
    return rng.randbytes(12).hex()


def rest_queries(seed: int, conversation: str) -> Iterator[tuple[str, dict[str, str]]]:
    """(path, query) pairs: conversation pages by cursor, message pages by offset."""
    rng = random.Random(seed)
    nested = base64.urlsafe_b64encode(b"[" * 3000).decode()
    for cursor in ("[" * 3000, nested, "\x00", "%00", "e30", "bnVsbA"):
        yield "/api/conversations", {"cursor": cursor}
    limits = ["", "0", "-1", "101", "abc", "1e9", "9" * 40, "5"]
    messages = f"/api/conversations/{conversation}/messages"
    for _ in range(QUERY_RANDOM):
        yield "/api/conversations", {"cursor": _cursor(rng), "limit": rng.choice(limits)}
        before = rng.choice(["", "0", "1", "-5", "x", "9" * 40, str(rng.randrange(10**6))])
        yield messages, {"before": before, "limit": rng.choice(limits)}


def _nested_headers(header: bytes, count: int, size: int = 65_536) -> bytes:
    """``count`` nested container headers, padded with nils to ``size`` bytes: an unbounded
    decoder trusts each header's length up to the frame's size, and reserves room for it."""
    head = header * count
    return head + b"\xc0" * (size - len(head))


def pre_auth_frames() -> list[bytes]:
    """Would-be auth frames: the attack of issue 20 (decoded before any token) and kin."""
    return [
        _nested_headers(b"\xdd\x00\x00\xff\xff", 1_000),  # array32(65535): ~500 MB reserved
        _nested_headers(b"\xdf\x00\x00\xff\xff", 1_000),  # map32
        _nested_headers(b"\xdd\x00\x00\xff\xff", 13_000),
        b"\xdb\xff\xff\xff\xff" + b"a" * 100,  # str32 that claims 4 GiB
    ]


def hostile_frames(seed: int) -> Iterator[bytes]:
    """MessagePack frames for an authenticated socket."""
    rng = random.Random(seed)
    yield from pre_auth_frames()
    yield b"\xc6\xff\xff\xff\xff" + b"\x00" * 10  # bin32 that claims 4 GiB
    yield b"\xc7\x01\x05a"  # an extension type
    yield b"\x91" * 5000 + b"\xc0"  # fixarrays nested 5,000 deep
    yield msgpack.packb({"type": "ping", "ts": 2**63})
    yield msgpack.packb({"type": "join", "conversation_id": b"\x00" * 16})
    types = ["auth", "join", "leave", "send", "cancel", "typing", "history", "ping", "x"]
    for _ in range(FRAMES_RANDOM):
        if rng.random() < 0.2:
            yield rng.randbytes(rng.randrange(1, 300))
            continue
        frame: dict[Any, Any] = {"type": rng.choice(types)}
        for name in rng.sample(["ref", "conversation_id", "text", "limit", "ts", "since"], 3):
            frame[name] = _value(rng)
        try:
            yield msgpack.packb(frame, use_bin_type=True, unicode_errors="surrogatepass")
        except (ValueError, TypeError, OverflowError):
            yield b"\x80"
