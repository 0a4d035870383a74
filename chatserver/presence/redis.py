"""Presence shared by every instance through Redis: one sorted set per conversation.

Each entry is (instance, user), scored by when it expires. An instance renews its entries
every third of the TTL for two thirds of it, and each renewal drops the conversation's
expired entries: a dead instance's users are gone within one TTL (its last renewal plus two
thirds, plus the third until another instance's next renewal), while a live one may miss a
renewal by up to a third without its users blinking out.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Mapping

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from storage import lua
from storage.redis_keys import DEFAULT_PREFIX, conversation_keys

from .base import Change

_LUA = "chatserver.presence"  # its lua/ directory
_COMMON = lua.source("common", _LUA)
_CONCURRENT = 100  # renewals in flight at once


def _script(name: str) -> str:
    return lua.script(name, _LUA, COMMON=_COMMON)


def _change(conversation_id: str, code: object) -> Change | None:
    value = int(code)  # type: ignore[call-overload]
    return None if value == 0 else Change(conversation_id, announce=value == 2)


class RedisPresence:
    name = "redis"
    shared = True

    def __init__(
        self,
        redis: Redis | RedisCluster,
        *,
        server_id: str,
        ttl_s: float,
        prefix: str = DEFAULT_PREFIX,
    ) -> None:
        self._redis = redis
        self.server_id = server_id
        self._prefix = prefix
        self.live_ms = max(1, int(ttl_s * 1000 * 2 / 3))
        self.key_ttl_ms = max(1, int(ttl_s * 1000))
        self._enter = redis.register_script(_script("enter"))
        self._exit = redis.register_script(_script("exit"))
        self._online = redis.register_script(_script("online"))
        self._renew = redis.register_script(_script("renew"))

    def _keys(self, conversation_id: str) -> list[str]:
        keys = conversation_keys(self._prefix, conversation_id)
        return [keys.presence, keys.watchers]

    async def enter(self, conversation_id: str, user_id: str) -> Change | None:
        code = await self._enter(
            keys=self._keys(conversation_id),
            args=[self.server_id, user_id, self.live_ms, self.key_ttl_ms],
        )
        return _change(conversation_id, code)

    async def exit(self, conversation_id: str, user_id: str) -> Change | None:
        code = await self._exit(keys=self._keys(conversation_id), args=[self.server_id, user_id])
        return _change(conversation_id, code)

    async def online(self, conversation_id: str) -> tuple[str, ...]:
        users = await self._online(keys=self._keys(conversation_id))
        return tuple(sorted(u.decode() if isinstance(u, bytes) else str(u) for u in users))

    async def renew(self, held: Mapping[str, Collection[str]]) -> list[Change]:
        items = [(conv, users) for conv, users in held.items() if users]
        changes: list[Change] = []
        for start in range(0, len(items), _CONCURRENT):
            chunk = items[start : start + _CONCURRENT]
            codes = await asyncio.gather(
                *(
                    self._renew(
                        keys=self._keys(conv),
                        args=[self.server_id, self.live_ms, self.key_ttl_ms, *users],
                    )
                    for conv, users in chunk
                )
            )
            changes.extend(
                change
                for (conv, _), code in zip(chunk, codes, strict=True)
                if (change := _change(conv, code)) is not None
            )
        return changes

    async def close(self) -> None:
        return None
