"""The production hot window: one Redis Stream per conversation, appended by one Lua script.

Keys (``storage.redis_keys``; all of one conversation share the hash tag ``{<conv>}``):
``seq`` the offset counter, ``epoch`` (its absence means the window is missing), ``win`` the
stream whose entry ids are the offsets (``<offset>-0``, so a range read is an id range) trimmed
to exactly ``size`` entries, and ``idem:<hash>`` one idempotency record per (user,
client_msg_id) holding the whole first message. ``epoch`` and ``win`` expire after
``key_ttl_s`` without an append; ``seq`` after twice that, so the counter never disappears
before the window it numbers (offsets must never be reused while a window shows them).

A window entry holds the msgpack payload Python encoded once (without offset and created_at)
and ``t``, the creation time in ms from Redis ``TIME`` (so every instance agrees on the order);
the id gives the offset. Entries loaded by ``rebuild`` carry the store's complete message.

**Append on a single Redis** is one script: idempotency check (a duplicate returns the stored
first message and changes nothing), window-missing check, outbox bound check (XLEN of the
conversation's outbox shard), INCR, TIME, XADD window, XADD outbox, SET idempotency record with
its TTL, TTL refresh. Either all of it happens or none.

**Append on Redis Cluster** (``cluster=True`` or a ``RedisCluster`` client): the outbox is in
another slot, which a script may not touch. So: Python checks the outbox shard's bound (XLEN),
the script does everything else, and Python XADDs the returned message to the outbox right
after, *before* ``append`` returns (the ack still follows both). A crash between the two steps
leaves a message in the window and the idempotency record but not in the outbox; the client got
no ack and resends with the same ``client_msg_id``, and the duplicate re-XADDs the stored
message to the outbox, which closes the gap (a replay is harmless: the store skips messages it
has). To tell the two cases apart the record's first byte says whether the message reached the
outbox (``p`` until Python marks it ``d`` after its XADD, one more round trip): a duplicate of a
message known to be queued enqueues nothing, one of an unconfirmed message enqueues it again
(perhaps a second time, which is harmless). A message sent without ``client_msg_id`` has no
such repair.

**Fan-out in the append**: given ``fanout_head`` (the app's, packing its pub/sub envelope of
the message's frame but for the offset and time, which the script adds), the script also
publishes each user message it appends on the conversation's channel (SPUBLISH on a
cluster: the channel shares the conversation's hash tag). So an acknowledged question has
reached the other instances, whatever instance dies when; the caller delivers it to its own
members only (``AppendResult.fanned_out``). A question with a reply job requires it: a
claimer never publishes the question again.

**Reply jobs in the append** (storage/jobs/redis.py): the count of the conversation's jobs is
one more key of the MGET; a question's job is added, or the one an answer answers finished,
in the same step, a cluster included (the jobs share the conversation's hash tag). The
holder's registry is another slot on a cluster: listed just before.

The bound check is not atomic with the append on a cluster: concurrent appends may overshoot
``max_entries`` by a few entries.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from redis.asyncio import RedisCluster

from protocol import Message, Role
from protocol.ids import uuid4_str

from .. import lua
from ..jobs.base import ReplyJobs
from ..jobs.redis import RedisReplyJobs, job_member
from ..outbox.base import Outbox, OutboxFull
from ..outbox.redis import AnyRedis, RedisOutbox
from ..records import AppendResult, MessageDraft, WindowView
from ..redis_codec import (
    decode_message,
    decode_record,
    draft_payload,
    message_from_draft,
    message_payload,
)
from ..redis_keys import DEFAULT_PREFIX, ConversationKeys, conversation_keys
from .base import AppendFollow, AppendGate, AppendRefused, WindowMissing
from .decoded import DecodedMessages
from .redis_entries import contiguous_tail, decode_entry, read_entries

# An enum's .value is a property: not looked up per message.
_USER, _ASSISTANT = Role.USER.value, Role.ASSISTANT.value

# Read when the module is imported: a missing or broken file fails at start-up, not mid-append.
# The append script's ``--GATE--`` line is a Lua comment: without a gate it is just that.
_READ_LUA = lua.script("window_read")
_APPEND_LUA = lua.script("window_append")
_REBUILD_LUA = lua.script("window_rebuild")
_MARK_QUEUED_LUA = lua.script("window_mark_queued")

# The append moves the window's TTLs forward when the offset is a multiple of this: a window
# written to at least this often in a TTL stays, a quieter one is rebuilt when next used.
TTL_EVERY = 16

# The codes of window_append.lua's replies.
_OK, _DUPLICATE, _MISSING, _FULL, _REFUSED = 0, 1, 2, 3, 4
_QUEUED, _UNQUEUED = b"d", b"p"  # first byte of an idempotency record


class RedisWindow:
    name = "redis"

    def __init__(
        self,
        redis: AnyRedis,
        *,
        prefix: str = DEFAULT_PREFIX,
        size: int = 200,
        idempotency_ttl_s: float = 86400,
        key_ttl_s: int = 7 * 86400,
        cluster: bool = False,
        context_cache_bytes: int = 32 * 1024 * 1024,
        fanout_head: Callable[[str, float, bytes], bytes] | None = None,
    ) -> None:
        if size < 1 or key_ttl_s < 1:
            raise ValueError("size and key_ttl_s must be at least 1")
        if redis.get_encoder().decode_responses:
            raise ValueError("the Redis client must not decode responses (payloads are binary)")
        self.redis = redis
        self.prefix = prefix
        self.size = size
        self.idempotency_ttl_s = idempotency_ttl_s
        self.key_ttl_s = int(key_ttl_s)
        # A cluster client cannot run the single-Redis script (the outbox is in another slot).
        self.cluster = cluster or isinstance(redis, RedisCluster)
        self.gates = not self.cluster
        self.follows = not self.cluster  # a follow's keys may be another slot's too
        # (conversation id, wall clock, payload): the fan-out envelope but offset and time
        self.fanout_head = fanout_head
        self._publish = "SPUBLISH" if self.cluster else "PUBLISH"
        self._read_script = redis.register_script(_READ_LUA)
        self._append_script = redis.register_script(_APPEND_LUA)
        # By the gate's and the follow's Lua: one per kind of gate and follow.
        self._composed_scripts: dict[tuple[str | None, str | None], Any] = {}
        self._rebuild_script = redis.register_script(_REBUILD_LUA)
        self.decoded = DecodedMessages(context_cache_bytes)  # recent()'s, for the next one
        self._mark_script = redis.register_script(_MARK_QUEUED_LUA)
        self.hits = 0
        self.misses = 0

    @property
    def _idem_ttl_ms(self) -> int:
        return max(0, int(self.idempotency_ttl_s * 1000))

    def keys(self, conversation_id: str) -> ConversationKeys:
        return conversation_keys(self.prefix, conversation_id)

    async def start(self) -> None:
        if isinstance(self.redis, RedisCluster):
            # redis-py 8.1: a cluster client first used by many tasks at once may hand some of
            # them a connection torn down mid-handshake; set it up once, here.
            await self.redis.initialize()

    async def close(self) -> None:
        pass  # the client belongs to the caller

    async def read(
        self,
        conversation_id: str,
        *,
        after: int = 0,
        before: int | None = None,
        limit: int,
    ) -> WindowView | None:
        keys = self.keys(conversation_id)
        low = max(after, 0) + 1
        count = limit
        high = "+"
        if before is not None:
            high = str(before - 1)
            if before - 1 < low:
                count = 0
        reply = await self._read_script(
            keys=[keys.epoch, keys.seq, keys.win], args=[high, str(low), max(count, 0)]
        )
        if reply is None:
            self.misses += 1
            return None
        self.hits += 1
        epoch, last_raw, first_raw, entries = reply
        last = int(last_raw)
        first = int(first_raw.split(b"-", 1)[0]) if first_raw else last + 1
        messages = tuple(decode_entry(entry) for entry in reversed(entries))
        return WindowView(
            epoch=epoch.decode(), last_offset=last, first_offset=first, messages=messages
        )

    async def recent(self, conversation_id: str, limit: int) -> tuple[Message, ...] | None:
        """The newest ``limit`` messages, oldest first, from one plain XREVRANGE (no epoch or
        counter: a reply's context needs neither); None when the stream holds nothing (a
        missing window: ``read`` tells it apart and the service rebuilds)."""
        entries: Any = await self.redis.xrevrange(self.keys(conversation_id).win, count=limit)
        if not entries:
            return None
        self.hits += 1
        return self.decoded.decode(conversation_id, read_entries(entries))

    def fill(self) -> Mapping[str, tuple[int, int]]:
        """The decoded messages kept for contexts (``storage.window.decoded``)."""
        return self.decoded.fill()

    async def rebuild(
        self, conversation_id: str, messages: Sequence[Message], last_offset: int
    ) -> None:
        keys = self.keys(conversation_id)
        last = max(last_offset, max((m.offset for m in messages), default=0))
        tail = contiguous_tail(messages, last, self.size)
        idem_keys: list[str] = []
        args: list[Any] = [
            secrets.token_hex(6),
            last,
            self.key_ttl_s,
            self._idem_ttl_ms,
            len(tail),
        ]
        for m in tail:
            index = 0
            if m.client_msg_id is not None:
                idem_keys.append(keys.idem(m.user_id, m.client_msg_id))
                index = len(idem_keys)
            args += [m.offset, message_payload(m), index]
        await self._rebuild_script(keys=[keys.seq, keys.epoch, keys.win, *idem_keys], args=args)

    def _composed_script(self, gate: str | None, follow: str | None) -> Any:
        script = self._composed_scripts.get((gate, follow))
        if script is None:
            if len(self._composed_scripts) >= 16:  # gates and follows come from fixed sources
                raise ValueError("too many kinds of append gates and follows")
            source = lua.composed("window_append", gate, follow)
            script = self.redis.register_script(source)
            self._composed_scripts[(gate, follow)] = script
        return script

    def context_since(self, conversation_id: str) -> tuple[int, bytes]:
        return self.decoded.since(conversation_id)

    def context_kept(self, conversation_id: str) -> tuple[Message, ...]:
        return self.decoded.kept(conversation_id)

    def context_of(
        self, conversation_id: str, read: Sequence[Any], limit: int
    ) -> tuple[Message, ...] | None:
        """What a follow read (``slot_after_append.lua``), through the context cache
        (``DecodedMessages.followed``)."""
        context = self.decoded.followed(conversation_id, read, limit)
        if context is not None:
            self.hits += 1
        return context

    async def append(
        self,
        draft: MessageDraft,
        outbox: Outbox,
        gate: AppendGate | None = None,
        jobs: ReplyJobs | None = None,
        answers: str | None = None,
        follow: Callable[[str], AppendFollow | None] | None = None,
    ) -> AppendResult:
        if not isinstance(outbox, RedisOutbox):
            raise TypeError(f"RedisWindow appends to a RedisOutbox, not {type(outbox).__name__}")
        cid = draft.conversation_id
        keys = self.keys(cid)
        message_id = uuid4_str()
        payload = draft_payload(message_id, draft)
        shard = outbox.shard_for(cid)
        idem_ttl_ms = 0
        idem_key = keys.no_idem
        if draft.client_msg_id is not None:
            idem_key = keys.idem(draft.user_id, draft.client_msg_id)
            idem_ttl_ms = self._idem_ttl_ms
        script_keys = [keys.seq, keys.epoch, keys.win, idem_key]
        script_args: list[Any] = [
            payload,
            self.size,
            idem_ttl_ms,
            self.key_ttl_s,
            # An answer's question passed the bound already: the overshoot is at most one
            # entry per running reply, and an answer refused here would only be retried.
            0 if draft.role == _ASSISTANT else outbox.max_entries,
            _UNQUEUED if self.cluster else _QUEUED,
            TTL_EVERY,
        ]
        fans_out = self.fanout_head is not None and draft.role == _USER
        if fans_out:
            assert self.fanout_head is not None
            head = self.fanout_head(cid, time.time(), payload)
            publish: list[Any] = [self._publish, keys.events, head]
        else:
            publish = ["", "", ""]
        redis_jobs = jobs if isinstance(jobs, RedisReplyJobs) else None
        adds_job = redis_jobs is not None and answers is None
        if adds_job and not fans_out:
            # A claimer never publishes a question again: the append is its only fan-out.
            raise TypeError("a question with a reply job needs the window's fanout_head")
        job_id = message_id if adds_job else ""
        member = job_member(cid, message_id) if adds_job else ""
        # The job lives in the conversation's slot: its append adds or finishes it, a cluster
        # too. Only the holder's registry is elsewhere on a cluster: listed before the append.
        script_keys += [keys.jobs_count, keys.jobs, keys.jobs_data]
        script_args += [job_id, redis_jobs.holder if redis_jobs is not None else ""]
        if self.cluster:
            if gate is not None or follow is not None:
                raise TypeError("a window on a cluster runs no gates or follows")
            await outbox.check_room(shard)
            if adds_job:
                assert redis_jobs is not None
                await self.redis.sadd(redis_jobs.registry, member)
            script_keys += [keys.no_idem, keys.no_idem]  # unused: other slots
            script_args.append("")
        else:
            script_keys.append(outbox.keys[shard])
            script_keys.append(redis_jobs.registry if redis_jobs is not None else keys.no_idem)
            script_args.append(member)
        script_args.append(answers if redis_jobs is not None and answers is not None else "")
        script_args += publish
        if (gate is not None or follow is not None) and self.cluster:
            raise TypeError("a window on a cluster runs no gates or follows")
        then = follow(message_id) if follow is not None and adds_job else None
        script_args += [len(gate.keys), len(gate.args)] if gate is not None else [0, 0]
        script = self._append_script
        if gate is not None or then is not None:
            script = self._composed_script(
                gate.lua if gate is not None else None, then.lua if then is not None else None
            )
        if gate is not None:
            script_keys.extend(gate.keys)
            script_args.extend(gate.args)
        if then is not None:
            script_keys.extend(then.keys)
            script_args.extend(then.args)
        reply = await script(keys=script_keys, args=script_args)
        code = int(reply[0])
        if code == _DUPLICATE:
            record: bytes = reply[1]
            offset, created_ms, first_payload = decode_record(record[1:])
            first = decode_message(first_payload, offset, created_ms)
            if record[:1] != _QUEUED:
                # The first attempt died before its outbox step (cluster): enqueue it now.
                await outbox.push(shard, first_payload, offset, created_ms)
                await self._mark_script(keys=[idem_key])
            if first.id != message_id:
                return AppendResult(message=first, duplicate=True, fanned_out=fans_out)
            # Our own first attempt (the client library retried the script after a dropped
            # connection): this call appended it (published it, when it fans out, and added
            # or finished its job), so the caller must reply and deliver it. Whether the job
            # was alone and what followed are lost with that reply: the caller asks as usual.
            if then is not None and redis_jobs is not None:
                # The follow may have stood for the job (none added): the job is added now
                # (once, however many times), or nothing would answer the question should
                # this instance die before its reply records a word.
                await redis_jobs.add(first)
            reply = [_OK, offset, created_ms]
        if code == _MISSING:
            raise WindowMissing(cid)
        if code == _REFUSED:
            raise AppendRefused(int(reply[1]), int(reply[2]))
        if code == _FULL:
            raise OutboxFull(f"outbox shard {shard} holds {outbox.max_entries} entries")
        offset, created_ms = int(reply[1]), int(reply[2])
        message = message_from_draft(message_id, draft, offset, created_ms)
        if code == _OK and draft.role == _ASSISTANT:
            # An answer written here comes into the next question's context from what is
            # kept: no read of it, and known before that question's append returns.
            self.decoded.add_next(cid, offset, payload, created_ms)
        if self.cluster and code != _DUPLICATE:
            await outbox.push(shard, payload, offset, created_ms)
            if idem_ttl_ms:
                await self._mark_script(keys=[idem_key])
        followed = reply[4] if len(reply) > 4 and reply[4] is not None else None
        if len(reply) > 5 and int(reply[5]) == 1:
            job_id = ""  # the follow's work stands for the question's job
        elif adds_job:
            assert redis_jobs is not None
            redis_jobs.added(message_id, created_ms)
        finishes = redis_jobs is not None and answers is not None
        if finishes:
            assert redis_jobs is not None and answers is not None
            redis_jobs.finished(cid, answers)
        return AppendResult(
            message=message,
            duplicate=False,
            job_id=job_id or None,
            job_done=finishes,
            job_first=len(reply) > 3 and int(reply[3]) == 1,
            fanned_out=fans_out,
            followed=followed,
        )

    async def knows(self, conversation_id: str, user_id: str | None, client_msg_id: str) -> bool:
        key = self.keys(conversation_id).idem(user_id, client_msg_id)
        return bool(await self.redis.exists(key))

    async def forget(self, conversation_id: str) -> None:
        keys = self.keys(conversation_id)
        await self.redis.delete(keys.epoch, keys.win)
