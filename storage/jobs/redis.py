"""Reply jobs in Redis: one stream for every conversation, with the consumer group
``repliers``, and per conversation a sorted set of its unfinished jobs by offset.

Nobody reads new entries (no ``XREADGROUP >``): a job enters the group's pending list
under its holder in the step that adds it (``XCLAIM … FORCE``, see ``add_job`` in
storage/lua/prelude.lua), so the instance that accepted the question runs its reply, next
to the members who asked (an unwatched reply costs Redis nothing per delta). The holder
renews its jobs' idle time every third of a lease; a dead holder's jobs go idle, and
``XAUTOCLAIM`` with the lease as minimum idle time hands them to a live instance.

The conversation's sorted set keeps the order across instances: a job runs when no older
one of its conversation is listed (``turn``). Its score is 2 * offset, made odd by the
holder's first ``turn`` (odd from the start when the window's append published the
question): a claimer that finds it even knows the question was maybe never fanned out, and
announces it first.

On a cluster the stream and a conversation's set live in different slots: ``add`` and
``done`` are two calls there (the window's append adds the job after its script, like the
outbox entry), which a crash may split; ``done`` removes the listing first, so a split
leaves a job that runs again and finds its answer stored, never a conversation held up.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from redis.asyncio import RedisCluster
from redis.exceptions import ResponseError

from protocol import Message, timestamp_to_ms

from .. import lua
from ..outbox.redis import AnyRedis
from ..redis_codec import decode_message, message_payload
from ..redis_keys import DEFAULT_PREFIX, ConversationKeys, jobs_key
from .base import JobStats, ReplyJob, Turn

GROUP = "repliers"  # as in the Lua scripts
_RENEW_MAX = 10_000  # more jobs than one instance ever holds (its bound is far lower)


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _job(entry: Any, claimed: bool) -> ReplyJob | None:
    job_id, fields = _s(entry[0]), entry[1]
    if not fields:  # deleted while pending
        return None
    # redis-py hands the fields as a dict (or a flat list, depending on its parser)
    values = (
        fields if isinstance(fields, dict) else dict(zip(fields[::2], fields[1::2], strict=True))
    )
    message = decode_message(values[b"m"], int(values[b"o"]), int(values[b"t"]))
    return ReplyJob(job_id, message, claimed)


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
    ) -> None:
        self.redis = redis
        self.holder = holder  # this instance's consumer name: its server id
        self.prefix = prefix
        self.key = jobs_key(prefix)
        self.lease_ms = int(lease_s * 1000)
        self.key_ttl_s = key_ttl_s
        self.cluster = cluster or isinstance(redis, RedisCluster)
        self._cursor = "0-0"  # where the next XAUTOCLAIM scan goes on
        self._add = redis.register_script(lua.script("jobs_add"))
        self._turn = redis.register_script(lua.script("jobs_turn"))
        self._done = redis.register_script(lua.script("jobs_done"))
        self._renew = redis.register_script(lua.script("jobs_renew"))
        self._stats = redis.register_script(lua.script("jobs_stats"))

    def listed(self, conversation_id: str) -> str:
        return ConversationKeys(self.prefix, conversation_id).jobs

    async def start(self) -> None:
        try:
            await self.redis.xgroup_create(self.key, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def close(self) -> None:
        pass  # the client belongs to the caller

    async def add(self, message: Message, *, announced: bool = False) -> str:
        listed = self.listed(message.conversation_id)
        created = timestamp_to_ms(message.created_at)
        args: list[Any] = [
            self.holder,
            message_payload(message),
            message.offset,
            created,
            self.key_ttl_s,
            1 if announced else "",
        ]
        if not self.cluster:
            return _s(await self._add(keys=[self.key, listed], args=args))
        job_id = _s(await self._add(keys=[self.key], args=args))
        await self.redis.zadd(listed, {job_id: 2 * message.offset + int(announced)})
        await self.redis.expire(listed, self.key_ttl_s)
        return job_id

    async def turn(self, job: ReplyJob) -> Turn:
        listed = self.listed(job.message.conversation_id)
        keys = [listed] if self.cluster else [listed, self.key]
        args: list[Any] = [job.job_id, job.message.offset]
        reply = await self._turn(keys=keys, args=args)
        announced = bool(int(reply[1]))
        while len(reply) > 3:  # a cluster: is the older job still in the stream?
            head = _s(reply[2])
            if await self.redis.xrange(self.key, head, head):
                break
            await self.redis.zrem(listed, head)  # gone (done halfway, or lost): stale
            reply = await self._turn(keys=keys, args=args)
        blocker = _s(reply[2]) if len(reply) > 2 else None
        return Turn(go=bool(int(reply[0])), announced=announced, blocker=blocker)

    async def done(self, job: ReplyJob) -> None:
        listed = self.listed(job.message.conversation_id)
        if self.cluster:
            await self.redis.zrem(listed, job.job_id)
            await self._done(keys=[self.key], args=[job.job_id])
        else:
            await self._done(keys=[self.key, listed], args=[job.job_id])

    async def renew(self, job_ids: Sequence[str]) -> list[str]:
        if not job_ids:
            return []
        ids = await self._renew(keys=[self.key], args=[self.holder, _RENEW_MAX, *job_ids])
        return [_s(i) for i in ids]

    async def claim(self, count: int) -> list[ReplyJob]:
        if count <= 0:
            return []
        try:
            reply = await self.redis.execute_command(
                "XAUTOCLAIM",
                self.key,
                GROUP,
                self.holder,
                self.lease_ms,
                self._cursor,
                "COUNT",
                count,
            )
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            await self.start()
            return []
        self._cursor = _s(reply[0])
        jobs = [_job(entry, True) for entry in reply[1]]
        return [job for job in jobs if job is not None]

    async def stats(self) -> JobStats:
        outstanding, age_ms = await self._stats(keys=[self.key])
        return JobStats(int(outstanding), int(age_ms) / 1000)

    def recover(self, questions: Iterable[Message]) -> int:
        # The jobs live in Redis and outlive any instance: nothing to rebuild from the store.
        return 0
