"""How the Redis outbox names its entries: stream ids made sortable, and XREADGROUP replies."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def padded_entry_id(shards: int, shard: int, stream_id: bytes | str) -> str:
    """A zero-padded form of the stream id (``<ms>-<seq>``, digits: Redis makes them), so
    that string order is stream order."""
    sid = stream_id.decode() if isinstance(stream_id, bytes) else stream_id
    ms, _, seq = sid.partition("-")
    padded = f"{ms.zfill(15)}-{(seq or '0').zfill(10)}"
    return padded if shards == 1 else f"{shard:03d}/{padded}"


def parse_entry_id(shards: int, entry_id: str) -> tuple[int, str] | None:
    shard_part, sep, padded = entry_id.rpartition("/")
    try:
        shard = int(shard_part) if sep else 0
        ms, dash, seq = padded.partition("-")
        if not dash or not 0 <= shard < shards:
            return None
        return shard, f"{int(ms)}-{int(seq)}"
    except ValueError:
        return None


def stream_items(response: Any) -> Iterable[tuple[Any, Any]]:
    """(stream key, entries) pairs of an XREADGROUP reply, RESP2 or RESP3."""
    if not response:
        return ()
    if isinstance(response, dict):
        return response.items()
    return ((item[0], item[1]) for item in response)
