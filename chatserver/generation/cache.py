"""The response cache: a cacheable agent's first-turn answers, reused for the same question.

Key: (agent, model, normalised prompt), where normalising casefolds, collapses whitespace
and strips; the agent part also carries a fingerprint of its system prompt and generation
settings, so editing an agent never serves answers written under the old one. Only whole
answers (finish ``stop``) are stored, with a TTL. Two implementations side by side:

- :class:`MemoryResponseCache`: an LRU per instance (the embedded default), bounded in
  entries and in the bytes of its answers;
- :class:`RedisResponseCache`: shared by every instance, one string key per answer under
  the Redis prefix (``<prefix>:rcache:<sha256>``), expiring by itself.
"""

from __future__ import annotations

import hashlib
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from storage.redis_keys import response_cache_key

from ..agents import Agent

MAX_ANSWER_CHARS = 64 * 1024  # longer answers are not worth a cache slot


def normalise_prompt(text: str) -> str:
    return " ".join(text.casefold().split())


@dataclass(frozen=True, slots=True)
class CacheKey:
    agent: str  # the agent id and a fingerprint of its prompt and settings
    model: str
    prompt: str  # normalised

    def digest(self) -> str:
        raw = "\x1f".join((self.agent, self.model, self.prompt)).encode()
        return hashlib.sha256(raw).hexdigest()


def cache_key(agent: Agent, model: str, prompt: str) -> CacheKey:
    setup = f"{agent.system_prompt}\x1f{agent.temperature}\x1f{agent.max_output_tokens}"
    if agent.thinking_budget is not None:  # absent: the keys of before it existed
        setup += f"\x1f{agent.thinking_budget}"
    fingerprint = hashlib.blake2b(setup.encode(), digest_size=6).hexdigest()
    return CacheKey(f"{agent.id}#{fingerprint}", model, normalise_prompt(prompt))


class ResponseCache(Protocol):
    name: str

    async def get(self, key: CacheKey) -> str | None: ...

    async def put(self, key: CacheKey, text: str) -> None: ...


class MemoryResponseCache:
    name = "memory"

    def __init__(
        self,
        ttl_s: float,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
        *,
        max_bytes: int = 32 * 1024 * 1024,
    ) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.max_bytes = max_bytes  # of the answers' texts (``sys.getsizeof``)
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, str]] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def fill(self) -> Mapping[str, tuple[int, int]]:
        """Entries and bound, for the gauges (``chatserver.ops.memory``)."""
        return {
            "response_cache_entries": (len(self._entries), self.max_entries),
            "response_cache_bytes": (self._bytes, self.max_bytes),
        }

    def _drop(self, digest: str) -> None:
        _, text = self._entries.pop(digest)
        self._bytes -= sys.getsizeof(text)

    async def get(self, key: CacheKey) -> str | None:
        digest = key.digest()
        entry = self._entries.get(digest)
        if entry is None:
            return None
        if entry[0] <= self._clock():
            self._drop(digest)
            return None
        self._entries.move_to_end(digest)
        return entry[1]

    async def put(self, key: CacheKey, text: str) -> None:
        if not text or len(text) > MAX_ANSWER_CHARS or self.ttl_s <= 0:
            return
        digest = key.digest()
        if digest in self._entries:
            self._drop(digest)
        self._entries[digest] = (self._clock() + self.ttl_s, text)
        self._bytes += sys.getsizeof(text)
        entries = self._entries
        while len(entries) > self.max_entries or (self._bytes > self.max_bytes and entries):
            self._drop(next(iter(entries)))


class RedisResponseCache:
    name = "redis"

    def __init__(self, redis: Any, *, prefix: str, ttl_s: float) -> None:
        self._redis = redis
        self._prefix = prefix
        self.ttl_s = ttl_s

    def redis_key(self, key: CacheKey) -> str:
        return response_cache_key(self._prefix, key.digest())

    async def get(self, key: CacheKey) -> str | None:
        value = await self._redis.get(self.redis_key(key))
        if value is None:
            return None
        return value.decode() if isinstance(value, bytes) else str(value)

    async def put(self, key: CacheKey, text: str) -> None:
        if not text or len(text) > MAX_ANSWER_CHARS or self.ttl_s <= 0:
            return
        await self._redis.set(self.redis_key(key), text.encode(), px=int(self.ttl_s * 1000))
