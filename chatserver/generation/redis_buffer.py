"""Resume buffers in Redis, shared by every instance, with the owner's lease.

Per conversation (keys share the conversation's hash tag): a hash with the running
reply's id, owner, agent, model, the message it answers, its last seq and the lease's end,
and a string with the text so far. Scripts run on Redis' clock so instances with skewed
clocks agree on leases. A global sorted set lists running replies by lease end, so any
instance can find the ones whose owner died; claiming one is atomic, so only one instance
ends it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError

from protocol import GenerationSnapshot

from .buffer import ClaimedReply, Delta, LeaseLost, ReplyOwner

_NOW = "local t = redis.call('TIME') local now = t[1] * 1000 + math.floor(t[2] / 1000) "

# How long a reply waiting for its conversation's slot stays next without asking again (it
# asks at least every 0.5 s; one that gave up or died stops holding the others back).
_WAITER_MS = 2000

_BEGIN = (
    _NOW
    + """
local cur = redis.call('HGET', KEYS[1], 'gid')
local waiting = redis.call('GET', KEYS[3])
if cur and cur ~= ARGV[1] then
  -- Taken: the first to wait is next. Else an instance whose sender asks again at once
  -- would take the slot back each time, before a waiter's next try (it polls), for ever.
  if not waiting then
    redis.call('SET', KEYS[3], ARGV[1], 'PX', ARGV[8])
  elseif waiting == ARGV[1] then
    redis.call('PEXPIRE', KEYS[3], ARGV[8])
  end
  return 0
end
if waiting and waiting ~= ARGV[1] then return 0 end  -- free, but promised to the waiter
if waiting then redis.call('DEL', KEYS[3]) end
redis.call('DEL', KEYS[1], KEYS[2])
local lease = now + tonumber(ARGV[6])
redis.call('HSET', KEYS[1], 'gid', ARGV[1], 'owner', ARGV[2], 'agent', ARGV[3],
           'model', ARGV[4], 'reply_to', ARGV[5], 'seq', 0, 'lease_until', lease)
redis.call('SET', KEYS[2], '')
redis.call('PEXPIRE', KEYS[1], ARGV[7])
redis.call('PEXPIRE', KEYS[2], ARGV[7])
return lease
"""
)

_APPEND = (
    _NOW
    + """
if redis.call('HGET', KEYS[1], 'gid') ~= ARGV[1] then return 0 end
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[2] then return 0 end
-- A delta sent again (a pipeline retried after a dropped connection) is not appended twice.
if tonumber(redis.call('HGET', KEYS[1], 'seq')) < tonumber(ARGV[3]) then
  redis.call('APPEND', KEYS[2], ARGV[4])
  redis.call('HSET', KEYS[1], 'seq', ARGV[3])
end
local lease = now + tonumber(ARGV[5])
redis.call('HSET', KEYS[1], 'lease_until', lease)
redis.call('PEXPIRE', KEYS[1], ARGV[6])
redis.call('PEXPIRE', KEYS[2], ARGV[6])
return lease
"""
)

_RENEW = (
    _NOW
    + """
if redis.call('HGET', KEYS[1], 'gid') ~= ARGV[1] then return 0 end
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[2] then return 0 end
local lease = now + tonumber(ARGV[3])
redis.call('HSET', KEYS[1], 'lease_until', lease)
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return lease
"""
)

_SNAPSHOT = """
local gid = redis.call('HGET', KEYS[1], 'gid')
if not gid then return false end
return {gid, redis.call('HGET', KEYS[1], 'seq'), redis.call('GET', KEYS[2]) or ''}
"""

_END = """
if redis.call('HGET', KEYS[1], 'gid') == ARGV[1] then
  redis.call('DEL', KEYS[1], KEYS[2])
  return 1
end
return 0
"""

_CLAIM = (
    _NOW
    + """
if redis.call('HGET', KEYS[1], 'gid') ~= ARGV[1] then return false end
local lease = tonumber(redis.call('HGET', KEYS[1], 'lease_until') or '0')
if lease > now then return false end
local f = redis.call('HMGET', KEYS[1], 'owner', 'agent', 'model', 'reply_to', 'seq')
local text = redis.call('GET', KEYS[2]) or ''
redis.call('DEL', KEYS[1], KEYS[2])
return {f[1], f[2], f[3], f[4], f[5], text}
"""
)


_CLUSTER_FANOUT = 64  # calls in flight at once when a batch spans a cluster's slots


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisReplyBuffer:
    name = "redis"

    def __init__(
        self,
        redis: Redis | RedisCluster,
        *,
        server_id: str,
        prefix: str = "chat",
        lease_s: float = 5.0,
    ) -> None:
        self._redis = redis
        self._server_id = server_id  # appends and renewals are always by this instance
        self._prefix = prefix
        self._lease_ms = int(lease_s * 1000)
        # The text outlives the lease so whoever claims a dead owner's reply can read it.
        self._ttl_ms = self._lease_ms * 12
        self._registry = f"{prefix}:replies"
        self._begin = redis.register_script(_BEGIN)
        self._append = redis.register_script(_APPEND)
        self._renew = redis.register_script(_RENEW)
        self._snapshot = redis.register_script(_SNAPSHOT)
        self._end = redis.register_script(_END)
        self._claim = redis.register_script(_CLAIM)

    def _keys(self, conversation_id: str) -> list[str]:
        tag = f"{self._prefix}:{{{conversation_id}}}"
        return [f"{tag}:reply", f"{tag}:reply_text"]

    def _begin_keys(self, conversation_id: str) -> list[str]:
        """With the reply waiting for the slot (the longest waiting: it goes next)."""
        return [*self._keys(conversation_id), f"{self._prefix}:{{{conversation_id}}}:reply_next"]

    def _ref(self, generation_id: str) -> str:
        return f"{self._prefix}:{{{generation_id}}}:reply_ref"

    @staticmethod
    def _member(conversation_id: str, generation_id: str) -> str:
        return f"{conversation_id}\t{generation_id}"

    async def begin(self, owner: ReplyOwner) -> bool:
        member = self._member(owner.conversation_id, owner.generation_id)
        # Registered before the buffer exists: an owner dying between the two steps leaves
        # a hint the sweep drops, never a buffer nobody would ever sweep.
        seconds, micros = await self._redis.time()
        hint = int(seconds) * 1000 + int(micros) // 1000 + self._lease_ms
        await self._redis.zadd(self._registry, {member: hint})
        lease = await self._begin(
            keys=self._begin_keys(owner.conversation_id),
            args=[
                owner.generation_id,
                owner.owner,
                owner.agent_id,
                owner.model,
                owner.reply_to,
                self._lease_ms,
                self._ttl_ms,
                _WAITER_MS,
            ],
        )
        if not lease:
            await self._redis.zrem(self._registry, member)
            return False
        await self._redis.zadd(self._registry, {member: int(lease)})
        await self._redis.set(
            self._ref(owner.generation_id), owner.conversation_id, px=self._ttl_ms
        )
        return True

    async def append(self, conversation_id: str, generation_id: str, seq: int, text: str) -> None:
        lease = await self._append(
            keys=self._keys(conversation_id),
            args=[generation_id, self._server_id, seq, text, self._lease_ms, self._ttl_ms],
        )
        if not lease:
            raise LeaseLost(generation_id)

    async def append_many(self, deltas: Sequence[Delta]) -> set[str]:
        """One round trip for a tick's deltas: a pipeline of the same script as ``append``."""
        if isinstance(self._redis, RedisCluster):
            # Keys of many slots: one call each, a bounded number in flight at a time.
            results: list[Any] = []
            for start in range(0, len(deltas), _CLUSTER_FANOUT):
                part = deltas[start : start + _CLUSTER_FANOUT]
                results += await asyncio.gather(*(self._append_args(d) for d in part))
        else:
            results = await self._append_pipelined(deltas)
        return {d[1] for d, lease in zip(deltas, results, strict=True) if not lease}

    def _append_args(self, delta: Delta) -> Any:
        conversation_id, generation_id, seq, text = delta
        return self._append(
            keys=self._keys(conversation_id),
            args=[generation_id, self._server_id, seq, text, self._lease_ms, self._ttl_ms],
        )

    async def _append_pipelined(self, deltas: Sequence[Delta]) -> list[Any]:
        assert isinstance(self._redis, Redis)
        results: list[Any] = [None] * len(deltas)
        todo = list(range(len(deltas)))
        for attempt in (1, 2):
            pipe = self._redis.pipeline(transaction=False)
            for index in todo:
                conversation_id, generation_id, seq, text = deltas[index]
                args = (generation_id, self._server_id, seq, text, self._lease_ms, self._ttl_ms)
                # EVALSHA straight, not through the Script: a pipeline holding a Script
                # asks SCRIPT EXISTS first, a second round trip on every batch.
                pipe.evalsha(self._append.sha, 2, *self._keys(conversation_id), *args)
            done: list[Any] = await pipe.execute(raise_on_error=False)
            missing = []
            for index, result in zip(todo, done, strict=True):
                if isinstance(result, NoScriptError) and attempt == 1:
                    missing.append(index)  # Redis restarted or flushed its scripts
                elif isinstance(result, Exception):
                    raise result
                else:
                    results[index] = result
            if not missing:
                break
            self._append.sha = await self._redis.script_load(self._append.script)
            todo = missing  # only those: the others were appended already
        return results

    async def snapshot(self, conversation_id: str) -> GenerationSnapshot | None:
        found = await self._snapshot(keys=self._keys(conversation_id), args=[])
        if not found:
            return None
        generation_id, seq, text = found
        return GenerationSnapshot(_s(generation_id), int(seq), _s(text))

    async def end(self, conversation_id: str, generation_id: str) -> None:
        await self._end(keys=self._keys(conversation_id), args=[generation_id])
        await self._redis.zrem(self._registry, self._member(conversation_id, generation_id))
        await self._redis.delete(self._ref(generation_id))

    async def renew(self, running: list[tuple[str, str]]) -> None:
        leases: dict[str, int] = {}
        for conversation_id, generation_id in running:
            lease = await self._renew(
                keys=self._keys(conversation_id),
                args=[generation_id, self._server_id, self._lease_ms, self._ttl_ms],
            )
            if lease:
                leases[self._member(conversation_id, generation_id)] = int(lease)
        if leases:
            await self._redis.zadd(self._registry, leases)

    async def owner_of(self, generation_id: str) -> ReplyOwner | None:
        conversation_id = await self._redis.get(self._ref(generation_id))
        if conversation_id is None:
            return None
        conversation_id = _s(conversation_id)
        fields = await self._redis.hgetall(self._keys(conversation_id)[0])
        data = {_s(k): _s(v) for k, v in fields.items()}
        if data.get("gid") != generation_id:
            return None
        return ReplyOwner(
            conversation_id,
            generation_id,
            data["owner"],
            data["agent"],
            data["model"],
            data["reply_to"],
        )

    async def expired(self) -> list[tuple[str, str]]:
        seconds, micros = await self._redis.time()
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        members = await self._redis.zrangebyscore(self._registry, "-inf", now_ms, start=0, num=100)
        out = []
        for member in members:
            conversation_id, _, generation_id = _s(member).partition("\t")
            out.append((conversation_id, generation_id))
        return out

    async def claim(self, conversation_id: str, generation_id: str) -> ClaimedReply | None:
        found = await self._claim(keys=self._keys(conversation_id), args=[generation_id])
        if not found:
            # Still alive (renewed meanwhile) or already ended/claimed: drop a stale hint.
            snapshot = await self.snapshot(conversation_id)
            if snapshot is None or snapshot.generation_id != generation_id:
                await self._redis.zrem(self._registry, self._member(conversation_id, generation_id))
            return None
        await self._redis.zrem(self._registry, self._member(conversation_id, generation_id))
        await self._redis.delete(self._ref(generation_id))
        owner, agent, model, reply_to, seq, text = (_s(v) for v in found)
        return ClaimedReply(
            ReplyOwner(conversation_id, generation_id, owner, agent, model, reply_to),
            int(seq),
            text,
        )
