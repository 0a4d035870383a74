"""The settings of memory: the bounds of the in-process structures that ids keep arriving in,
and the allocation tracing an operator may turn on.

docs/operations.md (Memory bounds) gives each bound's memory when full, in bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

from .declare import bad, positive, setting


@dataclass(frozen=True, slots=True)
class MemorySettings:
    idempotency_keys: int = setting(
        "idempotency_keys",
        100_000,
        "int",
        "embedded window: client_msg_ids remembered (the oldest are forgotten first)",
    )
    window_memory_bytes: int = setting(
        "window_memory_bytes",
        64 * 1024 * 1024,
        "int",
        "embedded window: bytes of hot messages held; past it the least recently used "
        "conversations are dropped (reloaded from the store when read again)",
    )
    context_cache_bytes: int = setting(
        "context_cache_bytes",
        32 * 1024 * 1024,
        "int",
        "Redis window: bytes of decoded messages kept from each conversation's last reply "
        "context, so the next reply decodes only what is new (LRU; 0: keep none)",
    )
    conversation_cache: int = setting(
        "conversation_cache",
        10_000,
        "int",
        "conversations (with their members) cached per instance for membership checks (LRU)",
    )
    limiter_users: int = setting(
        "limiter_users",
        10_000,
        "int",
        "embedded limiter: users whose rate buckets and day's token count are kept (LRU; "
        "a forgotten one starts from a full bucket and the store's count)",
    )
    ended_replies: int = setting(
        "ended_replies",
        10_000,
        "int",
        "replies whose end each instance remembers, so a second announcement is dropped",
    )
    tracemalloc_frames: int = setting(
        "tracemalloc_frames",
        0,
        "int",
        "trace Python allocations with this many frames each (0: off); the admin route "
        "/api/admin/memory/sites then shows which sites grew (costs CPU and memory)",
    )

    def __post_init__(self) -> None:
        positive(
            self,
            "idempotency_keys",
            "window_memory_bytes",
            "conversation_cache",
            "limiter_users",
            "ended_replies",
        )
        if self.context_cache_bytes < 0:
            raise bad(self, "context_cache_bytes", "must be >= 0")
        if not 0 <= self.tracemalloc_frames <= 64:
            raise bad(self, "tracemalloc_frames", "must be 0..64")
