"""Limits shared by every instance: atomic Lua scripts on Redis' clock."""

from __future__ import annotations

import asyncio
import contextlib

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from .base import TierLimits, UsageSeed, ms_until_next_utc_day, utc_day

_NOW = "local t = redis.call('TIME') local now = t[1] * 1000 + math.floor(t[2] / 1000) "

# Connections: a sorted set of connection ids scored by when they stop counting.
# 0: refused; 1: counted; 2: counted, and today's token counter (KEYS[2]) does not exist yet.
_OPEN = (
    _NOW
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
if redis.call('EXISTS', KEYS[2]) == 0 then return 2 end
return 1
"""
)

_RENEW = (
    _NOW
    + """
if redis.call('ZADD', KEYS[1], 'XX', 'CH', now + tonumber(ARGV[2]), ARGV[1]) then
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
end
return 1
"""
)

# A send's whole check in one round trip: today's tokens against the quota, then the token
# bucket (capacity: messages per minute, refilled continuously).
# -1: today's counter does not exist yet (the caller seeds it from the store and retries).
_CHECK_SEND = (
    _NOW
    + """
local used = redis.call('GET', KEYS[2])
if not used then return {-1, 0} end
if tonumber(used) >= tonumber(ARGV[2]) then return {2, 0} end
local capacity = tonumber(ARGV[1])
local rate = capacity / 60000
local tokens = tonumber(redis.call('HGET', KEYS[1], 't') or capacity)
local at = tonumber(redis.call('HGET', KEYS[1], 'at') or now)
tokens = math.min(capacity, tokens + math.max(0, now - at) * rate)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = math.ceil((1 - tokens) / rate) end
redis.call('HSET', KEYS[1], 't', tostring(tokens), 'at', now)
redis.call('PEXPIRE', KEYS[1], 120000)
if wait > 0 then return {1, wait} end
return {0, 0}
"""
)

_DAY_TTL_S = 2 * 24 * 3600


class RedisLimiter:
    name = "redis"

    def __init__(
        self,
        redis: Redis | RedisCluster,
        seed: UsageSeed,
        *,
        prefix: str = "chat",
        connection_ttl_s: float = 30.0,
    ) -> None:
        self._redis = redis
        self._seed = seed
        self._prefix = prefix
        self.connection_ttl_ms = int(connection_ttl_s * 1000)
        self._open = redis.register_script(_OPEN)
        self._renew = redis.register_script(_RENEW)
        self._check = redis.register_script(_CHECK_SEND)
        self._starting: set[asyncio.Task[None]] = set()  # counters being started, kept alive

    def _key(self, kind: str, user_id: str, *rest: str) -> str:
        # One user's keys share a hash tag: a cluster keeps them on one node.
        return ":".join([f"{self._prefix}:{{u:{user_id}}}:{kind}", *rest])

    async def open_connection(self, user_id: str, connection_id: str, limits: TierLimits) -> bool:
        day = utc_day()
        state = int(
            await self._open(
                keys=[self._key("conns", user_id), self._key("tokens", user_id, day)],
                args=[connection_id, limits.connections, self.connection_ttl_ms],
            )
        )
        if state == 2:
            # Start today's counter now, off the send path: else the user's first send of
            # the day takes 3 round trips and a store read (check_send's -1) instead of one.
            task = asyncio.get_running_loop().create_task(self._start_day(user_id, day))
            self._starting.add(task)
            task.add_done_callback(self._starting.discard)
        return state != 0

    async def _start_day(self, user_id: str, day: str) -> None:
        # Best effort: if this fails, the first check_send starts the counter itself.
        with contextlib.suppress(Exception):
            key = self._key("tokens", user_id, day)
            await self._redis.set(key, await self._seed(user_id, day), nx=True, ex=_DAY_TTL_S)

    async def close_connection(self, user_id: str, connection_id: str) -> None:
        await self._redis.zrem(self._key("conns", user_id), connection_id)

    async def renew_connections(self, connections: list[tuple[str, str]]) -> None:
        for user_id, connection_id in connections:
            await self._renew(
                keys=[self._key("conns", user_id)], args=[connection_id, self.connection_ttl_ms]
            )

    async def _used_key(self, user_id: str) -> str:
        """Today's token counter, started from the store's figure when it is new."""
        day = utc_day()
        key = self._key("tokens", user_id, day)
        if not await self._redis.exists(key):
            await self._redis.set(key, await self._seed(user_id, day), nx=True, ex=_DAY_TTL_S)
        return key

    async def check_send(self, user_id: str, limits: TierLimits) -> tuple[str, int] | None:
        day = utc_day()
        keys = [self._key("rate", user_id), self._key("tokens", user_id, day)]
        args = [limits.messages_per_minute, limits.daily_tokens]
        code, wait = (int(v) for v in await self._check(keys=keys, args=args))
        if code == -1:  # first send today on any instance: start from the store's figure
            seed = await self._seed(user_id, day)
            await self._redis.set(keys[1], seed, nx=True, ex=_DAY_TTL_S)
            code, wait = (int(v) for v in await self._check(keys=keys, args=args))
        if code == 2:
            return ("quota_exceeded", ms_until_next_utc_day())
        if code == 1:
            return ("rate_limited", wait)
        return None

    async def add_tokens(self, user_id: str, tokens: int) -> None:
        if tokens > 0:
            await self._redis.incrby(await self._used_key(user_id), tokens)
