"""Resume buffers in Redis, shared by every instance, owned under instance liveness.

Per conversation (keys share its hash tag, see storage/redis_keys.py): a hash with the
running reply's id, owner, agent, model, the message it answers, its last recorded seq and
whether it is watched, and a string with its text to that seq. A reply that no other
instance watches is recorded only at checkpoints (with the heartbeat); a watched one delta
by delta, before each is published.

Liveness is per instance, not per reply: ``heartbeat`` sets ``<prefix>:{inst-<id>}:alive``
for one lease, every third of a lease. Each instance lists its running replies in a set of
its own; the sweep of any instance finds instances whose key is gone and claims their
replies, atomically (one winner). After an owner's death the claimer has the text to the
last checkpoint (or the last delta, when watched): only the dead instance's own clients saw
more.

Round trips: on one Redis every call is one pipeline (``redis_calls.py``); on a cluster one
call per slot group. A question first in line takes its reply's slot in its own append
(``slot_follow``): that reply's start costs no round trip at all.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from protocol import GenerationSnapshot
from storage.lua import script as lua_script
from storage.lua import source as lua_source
from storage.redis_codec import as_str
from storage.redis_keys import (
    conversation_keys,
    instance_alive_key,
    instance_replies_key,
    instances_key,
)
from storage.window.base import AppendFollow, AppendGate

from .buffer import (
    ClaimedReply,
    Delta,
    LeaseLost,
    PreparedReply,
    Record,
    ReplyOwner,
    RunningReply,
    Slot,
)
from .redis_calls import Call, script_calls
from .redis_owner import find_owner

_LUA = "chatserver.generation"  # the package whose lua/ holds these scripts

# How long a reply waiting for its conversation's slot stays next without asking again (it
# asks at least every 0.5 s; one that gave up or died stops holding the others back).
_WAITER_MS = 2000
_SWEEP_BATCH = 100

# The release gate of a reply's own append: a function body of the window's gate.
_RELEASE_LUA = lua_source("release", _LUA)
# The slot taken in the question's own append: a function body of the window's follow.
_SLOT_AFTER_APPEND_LUA = lua_source("slot_after_append", _LUA)


class RedisReplyBuffer:
    name = "redis"
    in_process = False

    def __init__(
        self,
        redis: Redis | RedisCluster,
        *,
        server_id: str,
        prefix: str = "chat",
        lease_s: float = 5.0,
        incarnation: str | None = None,
    ) -> None:
        self._redis = redis
        # Asked per reply: a check against redis-py's client classes costs microseconds.
        self._cluster = isinstance(redis, RedisCluster)
        self._server_id = server_id  # records and heartbeats are always by this instance
        # This process's own: the value of its alive key, and of each reply it begins. One
        # started again under the same server id is alive again at once; its earlier run's
        # replies, of another incarnation, are a dead owner's all the same.
        self.incarnation = incarnation or secrets.token_hex(6)
        self._prefix = prefix
        self._lease_ms = int(lease_s * 1000)
        # The text outlives the owner's lease so whoever claims its reply can read it;
        # checkpoints extend it, so a reply longer than this keeps its entry.
        self._ttl_ms = self._lease_ms * 12
        self._alive_until = 0.0  # monotonic: our alive key surely exists until then
        self._instances = instances_key(prefix)
        self._swept: dict[tuple[str, str], str] = {}  # found by ``expired``: its dead owner
        # What an earlier run under our server id left in our list (``start``): it died, and
        # its replies are swept like a dead instance's by our first sweep.
        self._inherited: list[str] = []
        # Ended replies still listed as ours: taken off the list with the next heartbeat (one
        # SREM per interval, not per reply). A listed reply that ended is harmless: only a
        # sweep after our death reads the list, and its claim finds nothing to take.
        self._ended: list[str] = []
        self._begin = redis.register_script(lua_script("begin", _LUA))
        self._record = redis.register_script(lua_script("record", _LUA))
        self._snapshot = redis.register_script(lua_script("snapshot", _LUA))
        self._end = redis.register_script(lua_script("end", _LUA))
        self._claim = redis.register_script(lua_script("claim", _LUA))

    def _keys(self, conversation_id: str) -> list[str]:
        keys = conversation_keys(self._prefix, conversation_id)
        return [keys.reply, keys.reply_text]

    @staticmethod
    def _member(conversation_id: str, generation_id: str) -> str:
        return f"{conversation_id}\t{generation_id}"

    # -- calls ------------------------------------------------------------------------

    async def _calls(
        self, calls: Sequence[Call], extra: Sequence[tuple[Any, ...]] = ()
    ) -> list[Any]:
        return await script_calls(self._redis, calls, extra)

    def _alive_command(self) -> list[tuple[Any, ...]]:
        """Our alive key, when it may be older than a third of a lease (first reply)."""
        if time.monotonic() < self._alive_until:
            return []
        self._alive_until = time.monotonic() + self._lease_ms / 3000
        return [
            (
                "SET",
                instance_alive_key(self._prefix, self._server_id),
                self.incarnation,
                "PX",
                self._lease_ms,
            ),
            ("SADD", self._instances, self._server_id),
        ]

    # -- the owner's side -------------------------------------------------------------

    async def begin(self, owner: ReplyOwner) -> Slot | None:
        conv = conversation_keys(self._prefix, owner.conversation_id)
        member = self._member(owner.conversation_id, owner.generation_id)
        mine = instance_replies_key(self._prefix, self._server_id)
        # Listed as ours before the buffer exists: an owner dying between the two leaves a
        # member the sweep drops, never a buffer nobody would ever sweep. The list is also
        # how a cancel finds the reply's conversation (owner_of): no key per reply for that.
        extra = [*self._alive_command(), ("SADD", mine, member)]
        args = [
            owner.generation_id,
            owner.owner,
            owner.agent_id,
            owner.model,
            owner.reply_to,
            self._ttl_ms,
            _WAITER_MS,
            self.incarnation,
        ]
        keys = [conv.reply, conv.reply_text, conv.reply_next, conv.watchers]
        try:
            (taken,) = await self._calls([(self._begin, keys, args)], extra)
        except BaseException:
            self._alive_until = 0.0  # the key may not be set: the next begin sets it
            raise
        if not taken:
            await self._calls([], [("SREM", mine, member)])
            return None
        return Slot(watched=int(taken) == 3)

    def slot_follow(
        self,
        owner: ReplyOwner,
        later_model: str,
        context: int,
        since: tuple[int, bytes] = (0, b""),
    ) -> AppendFollow | None:
        if self._cluster or time.monotonic() >= self._alive_until:
            return None  # the instance's replies are another slot; liveness due: ``begin``
        conv = conversation_keys(self._prefix, owner.conversation_id)
        keys = (
            conv.reply,
            conv.reply_next,
            conv.watchers,
            instance_replies_key(self._prefix, self._server_id),
            conv.win,
            conv.epoch,
        )
        args = (
            owner.generation_id,
            owner.owner,
            owner.agent_id,
            owner.model,
            later_model,
            owner.reply_to,
            self._ttl_ms,
            self._member(owner.conversation_id, owner.generation_id),
            context,
            since[0],
            since[1],
            self.incarnation,
        )
        return AppendFollow(_SLOT_AFTER_APPEND_LUA, keys, args)

    def prepared(self, followed: object) -> PreparedReply | None:
        if not isinstance(followed, list) or not followed:
            return None  # 0: held, or promised to a waiter
        return PreparedReply(Slot(watched=int(followed[0]) == 3), followed[1:])

    async def append(self, conversation_id: str, generation_id: str, seq: int, text: str) -> None:
        if await self.append_many([(conversation_id, generation_id, seq, text)]):
            raise LeaseLost(generation_id)

    async def append_many(self, deltas: Sequence[Delta]) -> set[str]:
        return await self.record([Record(c, g, s, t) for c, g, s, t in deltas])

    async def record(self, records: Sequence[Record]) -> set[str]:
        calls: list[Call] = [
            (
                self._record,
                self._keys(r.conversation_id),
                [
                    r.generation_id,
                    self._server_id,
                    r.seq,
                    r.text,
                    self._ttl_ms if r.refresh else 0,
                    1 if r.mark_watched else 0,
                ],
            )
            for r in records
        ]
        results = await self._calls(calls)
        return {r.generation_id for r, ok in zip(records, results, strict=True) if not ok}

    def release_gate(self, conversation_id: str, generation_id: str) -> AppendGate | None:
        if self._cluster:
            return None  # a cluster's window takes no gates
        return AppendGate(_RELEASE_LUA, tuple(self._keys(conversation_id)), (generation_id,))

    async def end(self, conversation_id: str, generation_id: str, released: bool = False) -> None:
        if not released:
            await self._calls([(self._end, self._keys(conversation_id), [generation_id])])
        self._ended.append(self._member(conversation_id, generation_id))

    async def heartbeat(self) -> None:
        self._alive_until = 0.0
        ended, self._ended = self._ended, []
        extra = self._alive_command()
        if ended:
            extra.append(("SREM", instance_replies_key(self._prefix, self._server_id), *ended))
        try:
            await self._calls([], extra)
        except BaseException:
            self._ended = ended + self._ended  # taken off with the next one
            # Our alive key may not be set (a Redis restarted meanwhile may have let it run
            # out): the next reply's begin sets it, rather than take slots, in appends too,
            # as an instance the others sweep as dead.
            self._alive_until = 0.0
            raise

    # -- anyone's side ----------------------------------------------------------------

    async def _read(self, conversation_id: str) -> list[Any] | None:
        found = await self._snapshot(keys=self._keys(conversation_id), args=[])
        return list(found) if found else None

    async def snapshot(self, conversation_id: str) -> GenerationSnapshot | None:
        found = await self._read(conversation_id)
        if found is None:
            return None
        return GenerationSnapshot(as_str(found[0]), int(found[1]), as_str(found[2]))

    async def running(self, conversation_id: str) -> RunningReply | None:
        found = await self._read(conversation_id)
        if found is None:
            return None
        snapshot = GenerationSnapshot(as_str(found[0]), int(found[1]), as_str(found[2]))
        owner = as_str(found[3])
        # A hash of an older release has no incarnation: its owner's server id alone says.
        mine = owner == self._server_id and (not found[5] or as_str(found[5]) == self.incarnation)
        return RunningReply(snapshot, owner, as_str(found[4]) == "1", mine)

    async def owner_of(self, generation_id: str) -> ReplyOwner | None:
        return await find_owner(self._redis, self._prefix, generation_id)

    async def _dead(self) -> list[str]:
        members = [as_str(m) for m in await self._redis.smembers(self._instances)]
        others = [m for m in members if m != self._server_id]
        if not others:
            return []
        alive = [instance_alive_key(self._prefix, m) for m in others]
        if isinstance(self._redis, RedisCluster):
            found = [await self._redis.exists(key) for key in alive]
        else:
            pipe = self._redis.pipeline(transaction=False)
            for key in alive:
                pipe.exists(key)
            found = await pipe.execute()
        return [m for m, ok in zip(others, found, strict=True) if not ok]

    async def start(self) -> None:
        mine = instance_replies_key(self._prefix, self._server_id)
        self._inherited = [as_str(m) for m in await self._redis.smembers(mine)]

    async def expired(self) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        self._swept.clear()
        inherited, self._inherited = self._inherited, []
        for entry in inherited:
            conversation_id, _, generation_id = entry.partition("\t")
            out.append((conversation_id, generation_id))
            self._swept[(conversation_id, generation_id)] = self._server_id
        for server_id in await self._dead():
            replies = instance_replies_key(self._prefix, server_id)
            members = await self._redis.srandmember(replies, _SWEEP_BATCH)
            if not members:
                # Nothing left of it. An instance that was only slow re-adds itself with
                # its next heartbeat.
                await self._redis.srem(self._instances, server_id)
                continue
            for member in members:
                conversation_id, _, generation_id = as_str(member).partition("\t")
                out.append((conversation_id, generation_id))
                self._swept[(conversation_id, generation_id)] = server_id
        return out

    async def claim(self, conversation_id: str, generation_id: str) -> ClaimedReply | None:
        keys = self._keys(conversation_id)
        found = await self._read(conversation_id)
        if found is None or as_str(found[0]) != generation_id:
            # Ended or claimed already, or never begun: drop it from its dead owner's list.
            dead = self._swept.pop((conversation_id, generation_id), None)
            if dead is not None:
                await self._redis.srem(
                    instance_replies_key(self._prefix, dead),
                    self._member(conversation_id, generation_id),
                )
            return None
        owner = as_str(found[3])
        alive = await self._redis.get(instance_alive_key(self._prefix, owner))
        # Alive: its key is there, set by the incarnation that began the reply (a hash of
        # an older release has none: its key alone says).
        if alive is not None and (not found[5] or as_str(alive) == as_str(found[5])):
            return None
        member = self._member(conversation_id, generation_id)
        replies = instance_replies_key(self._prefix, owner)
        # Listed as ours before it may be (a reply kept for us to run again): should we die
        # too, the next sweep finds it; one we only end is taken off with our next heartbeat.
        mine = instance_replies_key(self._prefix, self._server_id)
        await self._redis.sadd(mine, member)
        args: list[str | int] = [
            generation_id,
            owner,
            self._server_id,
            self._ttl_ms,
            self.incarnation,
        ]
        claimed = await self._claim(keys=keys, args=args)
        if replies != mine:
            await self._redis.srem(replies, member)
        if not claimed or not int(claimed[6]):
            self._ended.append(member)
        if not claimed:
            return None
        agent, model, reply_to, seq, text = (as_str(v) for v in claimed[:5])
        kept = int(claimed[6]) == 1
        return ClaimedReply(
            ReplyOwner(conversation_id, generation_id, owner, agent, model, reply_to),
            int(seq),
            text,
            rerun_offset=int(claimed[5]) if kept else None,
        )
