"""The model guard shared by every instance: Lua scripts on Redis' clock.

Each model has two sorted sets under one hash tag: its requests in flight (permit tokens
scored by when their place expires: a holder renews its places every third of the lease, so
the places of an instance that died free themselves) and its requests started within the
last minute (scored by their start).
"""

from __future__ import annotations

import asyncio
import logging
import uuid

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from storage import lua
from storage.redis_keys import DEFAULT_PREFIX, model_key

from .model_guard import BUSY_POLL_MS, LEASE_S, Busy, ModelLimitTable, Permit, model_id

log = logging.getLogger("chatserver.limits")

_LUA = "chatserver.limits"
_ACQUIRE = lua.script("model_acquire", _LUA)
_RENEW = lua.script("model_renew", _LUA)
_GRANTED, _CONCURRENT, _PER_MINUTE = 0, 1, 2


class RedisModelGuard:
    name = "redis"

    def __init__(
        self,
        redis: Redis | RedisCluster,
        limits: ModelLimitTable,
        *,
        prefix: str = DEFAULT_PREFIX,
        lease_s: float = LEASE_S,
    ) -> None:
        self._redis = redis
        self.limits = limits
        self._prefix = prefix
        self.lease_ms = int(lease_s * 1000)
        self._acquire = redis.register_script(_ACQUIRE)
        self._renew = redis.register_script(_RENEW)
        self._held: dict[str, set[str]] = {}  # model -> tokens of the places held here
        self._renewer: asyncio.Task[None] | None = None
        self._releasing: set[asyncio.Task[None]] = set()

    def _keys(self, model: str) -> list[str]:
        return [
            model_key(self._prefix, model, "inflight"),
            model_key(self._prefix, model, "started"),
        ]

    async def acquire(self, model: str) -> Permit | Busy:
        key = model_id(model)
        limits = self.limits.of(key)
        token = uuid.uuid4().hex
        if limits.unlimited:
            return Permit(key, token, False)
        code, wait = (
            int(v)
            for v in await self._acquire(
                keys=self._keys(key),
                args=[token, limits.concurrent, limits.per_minute, self.lease_ms],
            )
        )
        if code == _CONCURRENT:
            return Busy("concurrent", limits.concurrent, BUSY_POLL_MS)
        if code == _PER_MINUTE:
            return Busy("per_minute", limits.per_minute, wait)
        permit = Permit(key, token, limits.concurrent > 0)
        if permit.concurrent:
            self._held.setdefault(key, set()).add(token)
            if self._renewer is None:
                self._renewer = asyncio.get_running_loop().create_task(
                    self._keep_renewed(), name="model-guard-renew"
                )
        return permit

    def release(self, permit: Permit) -> None:
        if not permit.concurrent:
            return
        held = self._held.get(permit.model)
        if held is not None:
            held.discard(permit.token)
            if not held:
                del self._held[permit.model]
        # Off the caller's path: a cancelled reply must close its upstream at once.
        task = asyncio.get_running_loop().create_task(self._remove(permit))
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)

    async def _remove(self, permit: Permit) -> None:
        try:
            await self._redis.zrem(self._keys(permit.model)[0], permit.token)
        except Exception as exc:  # the place expires with its lease instead
            log.warning("model guard place not released: %s", exc)

    async def _keep_renewed(self) -> None:
        while self._renewer is not None:
            await asyncio.sleep(self.lease_ms / 3000)
            for model, tokens in list(self._held.items()):
                if not tokens:
                    continue
                try:
                    await self._renew(keys=self._keys(model)[:1], args=[self.lease_ms, *tokens])
                except Exception as exc:  # a Redis outage: renewed at the next turn
                    log.warning("model guard places not renewed: %s", exc)

    async def close(self) -> None:
        renewer, self._renewer = self._renewer, None  # also ends its loop at the next turn
        if renewer is not None:
            renewer.cancel()
            # Bounded: a cancel that lands inside the Redis client's retry was seen swallowed
            # (the close then hung); the loop's own check ends it after its call instead.
            await asyncio.wait({renewer}, timeout=2)
        if self._releasing:
            await asyncio.wait(set(self._releasing), timeout=2)
        self._held.clear()
