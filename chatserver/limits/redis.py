"""Limits shared by every instance: atomic Lua scripts on Redis' clock."""

from __future__ import annotations

import asyncio
import contextlib
import time

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from storage import AppendGate, lua
from storage.redis_keys import DEFAULT_PREFIX, user_key

from .base import Refusal, TierLimits, UsageSeed, utc_day

_KNOWN_FOR_S = 60.0
_KNOWN_MAX = 100_000

_LUA = "chatserver.limits"  # its lua/ directory
_OPEN = lua.script("open", _LUA)  # count a connection
_RENEW = lua.script("renew", _LUA)
_BUCKET = lua.script("bucket", _LUA)  # one token of a kind's bucket (REST, creations)
# A send's whole check, the body of a function of K, A and V: run alone (check_send) or as the
# gate of the window's append (send_gate), which then costs no round trip of its own.
SEND_CHECK_LUA = lua.source("send_check", _LUA)
_CHECK_SEND = lua.gate_alone(SEND_CHECK_LUA)
# send_check.lua's codes: -1 today's counter does not exist yet, 1 rate limited, 2 quota.
_MISSING, _RATE, _QUOTA = -1, 1, 2

_DAY_TTL_S = 2 * 24 * 3600


def _refusal(code: int, value: int) -> Refusal | None:
    if code == _QUOTA:
        return Refusal.quota()
    if code == _RATE:
        return Refusal.rate(value)
    return None


class RedisLimiter:
    name = "redis"

    def __init__(
        self,
        redis: Redis | RedisCluster,
        seed: UsageSeed,
        *,
        prefix: str = DEFAULT_PREFIX,
        connection_ttl_s: float = 30.0,
    ) -> None:
        self._redis = redis
        self._seed = seed
        self._prefix = prefix
        self.connection_ttl_ms = int(connection_ttl_s * 1000)
        self._open = redis.register_script(_OPEN)
        self._renew = redis.register_script(_RENEW)
        self._check = redis.register_script(_CHECK_SEND)
        self._bucket = redis.register_script(_BUCKET)
        self._starting: set[asyncio.Task[None]] = set()  # counters being started, kept alive
        # Day counters seen to exist, until when (monotonic): a counter lives two days from
        # its start, so add_tokens need not ask again on every reply (only after a minute, in
        # case Redis lost its data; until then such a loss undercounts, never overcounts).
        self._known: dict[str, float] = {}

    def _key(self, kind: str, user_id: str, *rest: str) -> str:
        return user_key(self._prefix, user_id, kind, *rest)

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
            task = asyncio.get_running_loop().create_task(self._start_day_quietly(user_id, day))
            self._starting.add(task)
            task.add_done_callback(self._starting.discard)
        return state != 0

    async def _start_day_quietly(self, user_id: str, day: str) -> None:
        # Best effort: if this fails, the first send check starts the counter itself.
        with contextlib.suppress(Exception):
            await self._start_day(user_id, day)

    async def _start_day(self, user_id: str, day: str) -> str:
        """The day's token counter, from the store's figure (unless another instance was first)."""
        key = self._key("tokens", user_id, day)
        await self._redis.set(key, await self._seed(user_id, day), nx=True, ex=_DAY_TTL_S)
        return key

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
        now = time.monotonic()
        if self._known.get(key, 0.0) > now:
            return key
        if not await self._redis.exists(key):
            await self._start_day(user_id, day)
        if len(self._known) >= _KNOWN_MAX:
            self._known = {k: t for k, t in self._known.items() if t > now}
        if len(self._known) < _KNOWN_MAX:
            self._known[key] = now + _KNOWN_FOR_S
        return key

    def _send_keys(self, user_id: str, day: str) -> tuple[str, str]:
        # "bucket", not the former "rate": a string now, where that was a hash.
        return (self._key("bucket", user_id), self._key("tokens", user_id, day))

    async def check_send(self, user_id: str, limits: TierLimits) -> Refusal | None:
        day = utc_day()
        keys = self._send_keys(user_id, day)
        args = [limits.messages_per_minute, limits.daily_tokens]
        code, wait = (int(v) for v in await self._check(keys=keys, args=args))
        if code == _MISSING:  # first send today on any instance: start from the store's figure
            await self._start_day(user_id, day)
            code, wait = (int(v) for v in await self._check(keys=keys, args=args))
        return _refusal(code, wait)

    def send_gate(self, user_id: str, limits: TierLimits) -> AppendGate:
        return AppendGate(
            SEND_CHECK_LUA,
            self._send_keys(user_id, utc_day()),
            (limits.messages_per_minute, limits.daily_tokens),
        )

    async def gate_refused(self, user_id: str, code: int, value: int) -> Refusal | None:
        if code == _MISSING:
            await self._start_day(user_id, utc_day())
            return None
        refusal = _refusal(code, value)
        if refusal is None:
            raise ValueError(f"not a refusal of the send check: {code}")
        return refusal

    async def add_tokens(self, user_id: str, tokens: int) -> None:
        if tokens > 0:
            await self._redis.incrby(await self._used_key(user_id), tokens)

    async def take(self, user_id: str, kind: str, per_minute: int) -> Refusal | None:
        wait = int(await self._bucket(keys=[self._key(kind, user_id)], args=[per_minute]))
        return Refusal.rate(wait) if wait > 0 else None
