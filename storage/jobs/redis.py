"""Reply jobs in Redis: per conversation its unfinished jobs in order, per holder a registry
of the jobs it holds, claimed by the others once the holder's liveness runs out.

A conversation's jobs are three keys (``ConversationKeys.job_keys``, ``add_job`` in
storage/lua/prelude.lua): a sorted set of the job ids by offset, a hash of each job's
holder, time and question, and their count as a string, which the window's append reads
with the MGET that reads its idempotency record. No count: the question is first in line,
and usually needs no job at all (the reply slot its append takes stands for it). Else the
append adds the job in the same step, and the answer's append finishes it: each O(log n),
however many are queued. The job id is the question's id.

Liveness is per instance, not per job: ``renew`` (every third of a lease) sets the
instance's alive key for one lease (the key the resume buffers' heartbeat sets too) and lists
it among the job holders. Each holder lists its jobs in a registry of its own (``conv TAB job
id``): in the append's own step on one Redis, just before it on a cluster (another slot; a
member whose job never came is dropped by whoever looks). Done jobs leave the registry with
the next renewal: one SREM per interval, not per job. ``claim`` finds holders whose alive
key is gone and takes their jobs over one by one, each atomically (a job changes holder only
from the dead one: one winner).

``stats`` add up what each live holder reported with its last renewal (how many jobs it
holds, since when the oldest: one HSET per interval) and what is left in dead holders'
registries: a read of a few keys, whatever the number of jobs.

An instance started again under the same server id finds its registry still full: its first
``claim`` takes those jobs over like a dead holder's.

Releases before this one kept jobs in the stream ``chat:jobs`` (consumer group ``repliers``,
renewed by idle time). While that stream exists, ``claim`` also takes its entries idle
longer than a lease (their holder stopped: a rolling deploy's old instances) and makes them
jobs of this kind, so no question acked by an older release is left unanswered.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

import msgpack
from redis.asyncio import RedisCluster
from redis.exceptions import ResponseError

from protocol import Message, timestamp_to_ms

from .. import lua
from ..outbox.redis import AnyRedis
from ..redis_codec import as_str, decode_message, message_payload
from ..redis_keys import (
    DEFAULT_PREFIX,
    conversation_keys,
    instance_alive_key,
    instance_jobs_key,
    job_holders_key,
    job_reports_key,
    legacy_jobs_key,
)
from .base import JobStats, ReplyJob, Turn

_CLAIM_SCAN = 100  # registry members looked at per dead holder and claim
_LEGACY_GROUP = "repliers"  # of the previous releases' jobs stream


def job_member(conversation_id: str, job_id: str) -> str:
    """A job's member of its holder's registry."""
    return f"{conversation_id}\t{job_id}"


class RedisReplyJobs:
    name = "redis"
    shared = True

    def __init__(
        self,
        redis: AnyRedis,
        *,
        holder: str,
        prefix: str = DEFAULT_PREFIX,
        lease_s: float = 5.0,
        key_ttl_s: int = 7 * 86400,
        cluster: bool = False,
        incarnation: str = "1",
    ) -> None:
        self.redis = redis
        self.holder = holder  # this instance's server id
        self.prefix = prefix
        self.lease_ms = int(lease_s * 1000)
        self.key_ttl_s = key_ttl_s
        self.cluster = cluster or isinstance(redis, RedisCluster)
        self.registry = instance_jobs_key(prefix, holder)
        self._holders = job_holders_key(prefix)
        self._legacy = legacy_jobs_key(prefix)
        self.alive_key = instance_alive_key(prefix, holder)
        self.incarnation = incarnation  # the alive key's value (the process's, shared)
        # Registry members of jobs done here: off the registry with the next renewal. One
        # still listed is harmless: only a claim reads it, and finds its job gone.
        self._ended: list[str] = []
        self._inherited: list[str] = []  # this id's members from before start: claimed once
        self._held: dict[str, int] = {}  # the jobs held here: their questions' times (ms)
        self._reports = job_reports_key(prefix)
        self._add = redis.register_script(lua.script("jobs_add"))
        self._done = redis.register_script(lua.script("jobs_done"))
        self._take_script = redis.register_script(lua.script("jobs_take"))

    def job_keys(self, conversation_id: str) -> list[str]:
        return conversation_keys(self.prefix, conversation_id).job_keys()

    async def unfinished(self, conversation_id: str) -> list[tuple[str, str]]:
        """A conversation's unfinished jobs, oldest first: (job id, holder)."""
        order, data, _ = self.job_keys(conversation_id)
        ids = [as_str(i) for i in await self.redis.zrange(order, 0, -1)]
        packed = await self.redis.hmget(data, ids) if ids else []
        return [
            (i, as_str(msgpack.unpackb(p, raw=True)[0]))
            for i, p in zip(ids, packed, strict=True)
            if p
        ]

    async def start(self) -> None:
        # Before any append of this run: whatever the registry holds was an earlier run's.
        self._inherited = [as_str(m) for m in await self.redis.smembers(self.registry)]
        await self.renew()

    async def close(self) -> None:
        pass  # the client belongs to the caller

    async def add(self, message: Message) -> str:
        cid = message.conversation_id
        await self.redis.sadd(self.registry, job_member(cid, message.id))
        args: list[Any] = [
            message.id,
            message.offset,
            self.holder,
            timestamp_to_ms(message.created_at),
            message_payload(message),
            self.key_ttl_s,
        ]
        await self._add(keys=self.job_keys(cid), args=args)
        self.added(message.id, args[3])
        return message.id

    def added(self, job_id: str, created_ms: int) -> None:
        """A job this instance holds from now on (added by a window's append)."""
        self._held[job_id] = created_ms

    def finished(self, conversation_id: str, job_id: str) -> None:
        """A job finished (by its answer's append): off the registry with the next renewal."""
        self._held.pop(job_id, None)
        self._ended.append(job_member(conversation_id, job_id))

    async def turn(self, job: ReplyJob) -> Turn:
        order = self.job_keys(job.message.conversation_id)[0]
        oldest: Any = await self.redis.zrange(order, 0, 0, withscores=True)
        if not oldest or float(oldest[0][1]) >= job.message.offset:
            return Turn(go=True)
        return Turn(go=False, blocker=as_str(oldest[0][0]))

    async def done(self, job: ReplyJob) -> None:
        cid = job.message.conversation_id
        await self._done(keys=self.job_keys(cid), args=[job.job_id])
        self.finished(cid, job.job_id)

    async def renew(self) -> None:
        ended, self._ended = self._ended, []
        oldest = min(self._held.values(), default=0)
        calls: list[Any] = [
            self.redis.set(self.alive_key, self.incarnation, px=self.lease_ms),
            self.redis.sadd(self._holders, self.holder),
            self.redis.hset(self._reports, self.holder, f"{len(self._held)} {oldest}"),
        ]
        if ended:
            calls.append(self.redis.srem(self.registry, *ended))
        try:
            await asyncio.gather(*calls)
        except BaseException:
            self._ended = ended + self._ended  # taken off with the next one
            raise

    async def _dead_holders(self) -> list[str]:
        listed = [as_str(m) for m in await self.redis.smembers(self._holders)]
        others = [m for m in listed if m != self.holder]
        alive = await asyncio.gather(
            *(self.redis.exists(instance_alive_key(self.prefix, m)) for m in others)
        )
        return [m for m, found in zip(others, alive, strict=True) if not found]

    async def _take(self, member: str, dead: str) -> ReplyJob | None:
        """The job ``member`` of ``dead``'s registry, now ours; None when it is done or
        another instance took it first."""
        cid, _, job_id = member.partition("\t")
        mine = job_member(cid, job_id)
        if dead != self.holder:
            await self.redis.sadd(self.registry, mine)  # listed as ours before it is ours
        order, data, _ = self.job_keys(cid)
        found = await self._take_script(keys=[order, data], args=[job_id, dead, self.holder])
        if dead != self.holder:
            await self.redis.srem(instance_jobs_key(self.prefix, dead), member)
        if not found:
            self._ended.append(mine)
            return None
        offset, ms, payload = found
        self.added(job_id, int(ms))
        return ReplyJob(job_id, decode_message(payload, int(offset), int(ms)), claimed=True)

    async def _claim_legacy(self, count: int) -> list[ReplyJob]:
        """Jobs of an older release whose holder stopped renewing them, as jobs of ours."""
        if count <= 0 or not await self.redis.exists(self._legacy):
            return []
        try:
            reply = await self.redis.execute_command(
                "XAUTOCLAIM", self._legacy, _LEGACY_GROUP, self.holder, self.lease_ms, "0-0",
                "COUNT", count,
            )  # fmt: skip
        except ResponseError as exc:
            if "NOGROUP" in str(exc):
                return []
            raise
        taken: list[ReplyJob] = []
        for entry_id, fields in reply[1]:
            if fields:  # else deleted while pending: nothing to answer
                values = (
                    dict(fields)
                    if isinstance(fields, dict)
                    else dict(zip(fields[::2], fields[1::2], strict=True))
                )
                message = decode_message(values[b"m"], int(values[b"o"]), int(values[b"t"]))
                await self.add(message)
                legacy = conversation_keys(self.prefix, message.conversation_id).legacy_jobs
                await self.redis.zrem(legacy, entry_id)
                taken.append(ReplyJob(message.id, message, claimed=True))
            await self.redis.xack(self._legacy, _LEGACY_GROUP, entry_id)
            await self.redis.xdel(self._legacy, entry_id)
        return taken

    async def claim(self, count: int) -> list[ReplyJob]:
        taken: list[ReplyJob] = []
        while self._inherited and len(taken) < count:
            job = await self._take(self._inherited.pop(), self.holder)
            if job is not None:
                taken.append(job)
        taken += await self._claim_legacy(count - len(taken))
        for dead in await self._dead_holders() if len(taken) < count else []:
            registry = instance_jobs_key(self.prefix, dead)
            members = await self.redis.srandmember(registry, _CLAIM_SCAN)
            if not members:
                # Nothing left of it. An instance that was only slow lists itself again with
                # its next renewal.
                await asyncio.gather(
                    self.redis.srem(self._holders, dead), self.redis.hdel(self._reports, dead)
                )
                continue
            for member in members:
                if len(taken) >= count:
                    return taken
                job = await self._take(as_str(member), dead)
                if job is not None:
                    taken.append(job)
        return taken

    async def stats(self) -> JobStats:
        holders = [as_str(m) for m in await self.redis.smembers(self._holders)]
        reports: dict[Any, Any] = await self.redis.hgetall(self._reports)
        dead = set(await self._dead_holders())
        left = dict(
            zip(
                dead,
                await asyncio.gather(
                    *(self.redis.scard(instance_jobs_key(self.prefix, h)) for h in dead)
                ),
                strict=True,
            )
        )
        outstanding, oldest = len(self._held), min(self._held.values(), default=0)
        for holder in holders:
            if holder == self.holder:
                continue
            reported, _, since = as_str(reports.get(holder.encode(), b"0 0")).partition(" ")
            count = int(left.get(holder, reported))  # what is left of a dead one
            if count > 0:
                outstanding += count
                oldest = min(oldest or int(since), int(since) or oldest)
        if outstanding == 0 or oldest == 0:
            return JobStats(outstanding, 0.0)
        seconds, micros = await self.redis.time()
        return JobStats(outstanding, max(0, seconds * 1000 + micros // 1000 - oldest) / 1000)

    def recover(self, questions: Iterable[Message]) -> int:
        # The jobs live in Redis and outlive any instance: nothing to rebuild from the store.
        return 0
