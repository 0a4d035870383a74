"""The production outbox: a Redis Stream with one consumer group shared by every instance.

Layout (see ``storage.redis_keys``): ``chat:outbox``, or with ``shards > 1`` the streams
``chat:outbox:{0}`` ... ``chat:outbox:{n-1}``, each with its own hash tag so that the shards
spread over a Redis Cluster; a conversation's messages always go to the same shard. Each shard
has the consumer group ``writers``; every instance reads as its own consumer.

- ``add``/the window's append put an entry ``m`` (msgpack payload) [``o`` offset, ``t`` created
  ms] on the stream; ``max_entries`` bounds each shard (XLEN, which counts pending entries too,
  because ``ack`` deletes what it acknowledges).
- ``read`` first takes back this consumer's own pending entries that it never handed out
  (``XREADGROUP`` from id 0; at the first read, and after a read failed: a reply lost with
  its connection, say to a Redis restart, leaves its entries pending here, and they must not
  wait ``claim_idle_ms`` like a dead instance's), then reclaims, at most every
  ``claim_idle_ms / 4``, entries pending longer than ``claim_idle_ms`` (XAUTOCLAIM: a dead
  instance's batch), then reads new ones with
  ``XREADGROUP ... BLOCK``. A blocking read is cut into short blocks (at most
  ``_BLOCK_CHUNK_S``) so it never holds a connection for long, and it runs in a task of its
  own: a read whose caller timed out or was cancelled keeps going and its entries are handed
  out by the next ``read`` (nothing is read and then dropped). On a single Redis one
  ``XREADGROUP`` covers every shard; on a cluster each shard is read on its own, concurrently.
- ``ack`` is XACK + XDEL of the entries in one round trip (one per node on a cluster).
- An entry that does not decode is logged and acked away, so that it cannot stall the writers.

Replays are harmless (the store skips messages it has), so a reclaimed batch whose first writer
was only slow is merely written twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Sequence
from typing import Any, TypeAlias

from redis.asyncio import Redis, RedisCluster
from redis.exceptions import ResponseError

from protocol import Message

from .. import lua
from ..records import OutboxEntry
from ..redis_codec import OFFSET, PAYLOAD, TIME_MS, decode_stored, message_payload
from ..redis_keys import DEFAULT_PREFIX, outbox_key, outbox_shard
from .base import OutboxFull
from .stream_ids import padded_entry_id, parse_entry_id, stream_items

log = logging.getLogger("storage.outbox.redis")

AnyRedis: TypeAlias = "Redis | RedisCluster"
_BLOCK_CHUNK_S = 1.0
_Raw: TypeAlias = "tuple[int, bytes, dict[bytes, bytes] | None]"  # (shard, stream id, fields)

_ADD_LUA = lua.script("outbox_add")  # check the bound and add in one step
_ACK_LUA = lua.script("outbox_ack")  # XACK and XDEL of a batch: one command, not a pipeline


def _observe(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()


class RedisOutbox:
    name = "redis"
    shared = True

    def __init__(
        self,
        redis: AnyRedis,
        *,
        prefix: str = DEFAULT_PREFIX,
        consumer: str,
        group: str = "writers",
        max_entries: int = 1_000_000,
        claim_idle_ms: int = 30_000,
        shards: int = 1,
    ) -> None:
        if max_entries < 1 or shards < 1 or claim_idle_ms < 1:
            raise ValueError("max_entries, shards and claim_idle_ms must be at least 1")
        if not consumer:
            raise ValueError("consumer must name this instance")
        if redis.get_encoder().decode_responses:
            raise ValueError("the Redis client must not decode responses (payloads are binary)")
        self.redis = redis
        self.prefix = prefix
        self.consumer = consumer
        self.group = group
        self.max_entries = max_entries  # per shard
        self.claim_idle_ms = claim_idle_ms
        self.shards = shards
        self.cluster = isinstance(redis, RedisCluster)
        self.keys = [outbox_key(prefix, shards, i) for i in range(shards)]
        self._add_script = redis.register_script(_ADD_LUA)
        self._ack_script = redis.register_script(_ACK_LUA)
        # Read units: one XREADGROUP each. Cross-slot reads are refused on a cluster.
        self._units: list[tuple[int, ...]] = (
            [(i,) for i in range(shards)] if self.cluster else [tuple(range(shards))]
        )
        self._inflight: dict[int, asyncio.Task[list[_Raw]]] = {}
        self._buffer: deque[OutboxEntry] = deque()
        self._read_lock = asyncio.Lock()
        self._waker: asyncio.Future[None] | None = None  # ``interrupt`` ends this wait
        self._interrupts = 0  # ... one wait each: of a read to come when none waits
        self._next_claim = 0.0
        self._claim_cursor = ["0-0"] * shards
        # Our own pending entries are read again at the first read and after a failed one;
        # those handed out and not acked yet (``_out``) are the batch writer's, not lost.
        self._recover = True
        self._own_cursor = ["0-0"] * shards
        self._out: set[str] = set()
        self.reclaimed = 0  # entries taken over from idle consumers
        self.poisoned = 0  # entries dropped because they did not decode

    # -- helpers for the window --------------------------------------------------------

    def shard_for(self, conversation_id: str) -> int:
        return outbox_shard(conversation_id, self.shards)

    def key_for(self, conversation_id: str) -> str:
        return self.keys[self.shard_for(conversation_id)]

    async def check_room(self, shard: int) -> None:
        """Raise ``OutboxFull`` when the shard is at its bound (the cluster path of append)."""
        if await self.redis.xlen(self.keys[shard]) >= self.max_entries:
            raise OutboxFull(f"outbox shard {shard} holds {self.max_entries} entries")

    async def push(self, shard: int, payload: bytes, offset: int, created_ms: int | None) -> None:
        """Add an entry without the bound check (its room was checked before the window step)."""
        fields: dict[bytes, bytes | int] = {PAYLOAD: payload, OFFSET: offset}
        if created_ms is not None:
            fields[TIME_MS] = created_ms
        await self.redis.xadd(self.keys[shard], fields)  # type: ignore[arg-type]

    # -- Outbox ------------------------------------------------------------------------

    async def start(self) -> None:
        if isinstance(self.redis, RedisCluster):
            # redis-py 8.1: a cluster client first used by many tasks at once may hand some of
            # them a connection torn down mid-handshake; set it up once, here.
            await self.redis.initialize()
        await self._ensure_groups()

    async def close(self) -> None:
        tasks = list(self._inflight.values())
        self._inflight.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        # Whatever was read but not handed out stays pending and is reclaimed in time.
        self._buffer.clear()
        self._out.clear()

    async def add(self, message: Message) -> None:
        shard = self.shard_for(message.conversation_id)
        added = await self._add_script(
            keys=[self.keys[shard]],
            args=[self.max_entries, PAYLOAD, message_payload(message)],
        )
        if not added:
            raise OutboxFull(f"outbox shard {shard} holds {self.max_entries} entries")

    async def read(self, max_count: int, max_wait_s: float) -> list[OutboxEntry]:
        if max_count < 1:
            return []
        async with self._read_lock:
            try:
                return await self._read(max_count, max_wait_s)
            except Exception:
                self._recover = True
                raise

    async def _read(self, max_count: int, max_wait_s: float) -> list[OutboxEntry]:
        """Under the read lock."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, max_wait_s)
        # What is at hand first, without waiting: read earlier but not handed out, idle
        # entries of dead consumers, then new entries of every shard.
        if len(self._buffer) < max_count:
            await self._harvest(set())
        if self._recover and len(self._buffer) < max_count:
            self._recover = await self._recover_own(max_count)
        if len(self._buffer) < max_count and time.monotonic() >= self._next_claim:
            self._next_claim = time.monotonic() + self.claim_idle_ms / 4000
            await self._accept(await self._reclaim(max_count))
        if len(self._buffer) < max_count:
            need = max_count - len(self._buffer)
            results = await asyncio.gather(
                *(self._read_unit(unit, need, None) for unit in self._units)
            )
            await self._accept([raw for result in results for raw in result])
        if self._buffer:
            return self._take(max_count)
        # Idle, it ends by the next claim (made at a read's start): a long wait delays none.
        deadline = min(deadline, loop.time() + max(0.0, self._next_claim - time.monotonic()))
        # Nothing there: block, in short blocks, until an entry comes or time is up.
        while True:
            remaining = deadline - loop.time()
            if self._interrupts or remaining <= 0:  # an ending wait takes one interrupt
                self._interrupts = max(0, self._interrupts - 1)
                return []
            block_ms = max(1, int(min(remaining, _BLOCK_CHUNK_S) * 1000))
            for index, unit in enumerate(self._units):
                if index not in self._inflight:
                    task = asyncio.create_task(
                        self._read_unit(unit, max_count, block_ms),
                        name=f"outbox.read.{index}",
                    )
                    # Seen by _harvest; this only keeps asyncio from warning about a
                    # failure nobody collected because no read came after it.
                    task.add_done_callback(_observe)
                    self._inflight[index] = task
            waker = self._waker = loop.create_future()  # cut short, the reads go on
            waited: list[asyncio.Future[Any]] = [*self._inflight.values(), waker]
            try:
                done, _ = await asyncio.wait(
                    waited, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                self._waker = None
                waker.cancel()
            await self._harvest({t for t in self._inflight.values() if t in done})
            if self._buffer:
                return self._take(max_count)

    def interrupt(self) -> None:
        self._interrupts += 1
        if self._waker is not None and not self._waker.done():
            self._waker.set_result(None)

    async def ack(self, entry_ids: Sequence[str]) -> None:
        self._out.difference_update(entry_ids)
        by_shard: dict[int, list[str]] = {}
        for entry_id in entry_ids:
            parsed = parse_entry_id(self.shards, entry_id)
            if parsed is not None:
                by_shard.setdefault(parsed[0], []).append(parsed[1])
        if by_shard:
            await self._ack_raw(by_shard)

    async def backlog(self) -> int:
        if self.shards == 1:
            return int(await self.redis.xlen(self.keys[0]))
        pipe = self.redis.pipeline(transaction=False)
        for key in self.keys:
            pipe.xlen(key)
        return sum(int(n) for n in await pipe.execute())

    # -- internals ---------------------------------------------------------------------

    async def _ensure_groups(self) -> None:
        for key in self.keys:
            try:
                await self.redis.xgroup_create(key, self.group, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def _harvest(self, done: set[asyncio.Task[list[_Raw]]]) -> None:
        """Take in the results of finished blocking reads (``done`` and any others finished)."""
        failure: BaseException | None = None
        for index, task in list(self._inflight.items()):
            if task in done or task.done():
                del self._inflight[index]
                if task.cancelled():
                    continue
                exc = task.exception()
                if exc is not None:
                    failure = exc
                else:
                    await self._accept(task.result())
        if failure is not None:
            self._recover = True
            if not self._buffer:
                raise failure
            log.warning("an outbox read failed (entries in hand go first): %r", failure)

    async def _recover_own(self, count: int) -> bool:
        """Take back our pending entries that are neither in hand nor handed out.

        A page at a time (from a cursor per shard); True while more may follow.
        """
        results = await asyncio.gather(
            *(self._read_unit(unit, count, None, own=True) for unit in self._units)
        )
        raws = [raw for result in results for raw in result]
        more = False
        for shard in range(self.shards):
            last = [raw[1] for raw in raws if raw[0] == shard]
            if len(last) >= count:
                more = True
                sid = last[-1]
                self._own_cursor[shard] = sid.decode() if isinstance(sid, bytes) else str(sid)
        if not more:
            self._own_cursor = ["0-0"] * self.shards
        held = self._out | {entry.entry_id for entry in self._buffer}
        lost = [raw for raw in raws if padded_entry_id(self.shards, raw[0], raw[1]) not in held]
        if lost:
            log.warning("took back %d outbox entries whose read was lost", len(lost))
            await self._accept(lost)
        return more

    async def _read_unit(
        self, unit: tuple[int, ...], count: int, block_ms: int | None, *, own: bool = False
    ) -> list[_Raw]:
        streams: dict[Any, Any] = {
            self.keys[shard]: self._own_cursor[shard] if own else ">" for shard in unit
        }
        try:
            response = await self.redis.xreadgroup(
                self.group, self.consumer, streams, count=count, block=block_ms
            )
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            # The stream or its group is gone (a flush, a restart without persistence).
            await self._ensure_groups()
            return []
        shard_of = {self.keys[shard].encode(): shard for shard in unit}
        raws: list[_Raw] = []
        for key, entries in stream_items(response):
            shard = shard_of[key if isinstance(key, bytes) else str(key).encode()]
            raws.extend((shard, entry[0], entry[1]) for entry in entries)
        return raws

    async def _reclaim(self, count: int) -> list[_Raw]:
        async def one(shard: int) -> list[_Raw]:
            try:
                reply = await self.redis.xautoclaim(
                    self.keys[shard],
                    self.group,
                    self.consumer,
                    self.claim_idle_ms,
                    start_id=self._claim_cursor[shard],
                    count=count,
                )
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                await self._ensure_groups()
                return []
            cursor = reply[0]
            self._claim_cursor[shard] = cursor.decode() if isinstance(cursor, bytes) else cursor
            return [(shard, entry[0], entry[1]) for entry in reply[1] if entry]

        results = await asyncio.gather(*(one(shard) for shard in range(self.shards)))
        raws = [raw for result in results for raw in result]
        if raws:
            self.reclaimed += len(raws)
            log.warning("reclaimed %d outbox entries left pending by an idle consumer", len(raws))
        return raws

    async def _accept(self, raws: list[_Raw]) -> None:
        """Decode read entries into the buffer; ack away those that do not decode."""
        poison: dict[int, list[str]] = {}
        for shard, stream_id, fields in raws:
            sid = stream_id.decode() if isinstance(stream_id, bytes) else str(stream_id)
            try:
                if fields is None:  # deleted while pending (Redis 6.2 XAUTOCLAIM)
                    raise ValueError("entry was deleted")
                offset = fields.get(OFFSET)
                created = fields.get(TIME_MS)
                message = decode_stored(
                    fields[PAYLOAD],
                    int(offset) if offset is not None else None,
                    int(created) if created is not None else None,
                )
            except Exception as exc:
                log.error(
                    "dropping undecodable outbox entry %s of %s: %r", sid, self.keys[shard], exc
                )
                poison.setdefault(shard, []).append(sid)
                continue
            entry_id = padded_entry_id(self.shards, shard, sid)
            self._buffer.append(OutboxEntry(entry_id=entry_id, message=message))
        if poison:
            self.poisoned += sum(len(ids) for ids in poison.values())
            await self._ack_raw(poison)

    def _take(self, max_count: int) -> list[OutboxEntry]:
        count = min(max_count, len(self._buffer))
        taken = [self._buffer.popleft() for _ in range(count)]
        self._out.update(entry.entry_id for entry in taken)
        return taken

    async def _ack_raw(self, by_shard: dict[int, list[str]]) -> None:
        # A script call per shard joins the client's own batch where it has one (the
        # server's tick pipeline): a redis-py pipeline of its own cost a batch ~1% of an
        # instance under fan-out load.
        await asyncio.gather(
            *(
                self._ack_script(keys=[self.keys[shard]], args=[self.group, *ids])
                for shard, ids in by_shard.items()
            )
        )
