"""Fan-out through Redis pub/sub: one subscriber connection per instance.

A conversation's channel (``<prefix>:{<conversation>}:events``, hash-tagged like the
conversation's keys) is subscribed when its first local member joins and dropped when the
last one leaves. Each published frame is encoded once (msgpack of origin, time, frame);
every receiving instance decodes it once and the hub frames it once per encoding in use.

Own publications: delivered to local members at once, without a Redis round trip, and
their echo from Redis is dropped by origin id. So local members never wait on Redis and
each event reaches each instance exactly once.

Publishing is auto-pipelined: frames queued in the same moment go out in one round trip
(awaited one by one, a connection manages ~5k PUBLISH/s; pipelined, hundreds of
thousands). The queue is bounded: publishers wait when it is full.

When the subscriber connection drops, the reader reconnects with capped backoff and
resubscribes; events published meanwhile are lost to this instance, so ``on_gap`` is
called and the app tells the affected clients to rejoin (they recover with ``since``).
Redis Cluster: sharded pub/sub (SSUBSCRIBE/SPUBLISH) so a channel lives on one shard.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import RedisError

from protocol.backoff import Backoff
from storage.redis_keys import control_channel as control_channel_name
from storage.redis_keys import conversation_keys

from ...redis_ticks import pack_commands
from ..envelope import Control, ControlEnvelope, Envelope, own_event_test, unpack
from ..events import Event
from .base import BrokerUnavailable, Deliver, OnControl, deliver_subscribed
from .subscriber import Subscriber

log = logging.getLogger("chatserver.broker.redis")

RECONNECT = Backoff(0.05, 5.0)  # publishing again after Redis failed
_GAP_DEBOUNCE_S = 1.0
_FLUSH_ON_CLOSE_S = 5.0  # one reconnect resubscribes many channels: one resync
# A dead instance's entry in a watchers set only costs needless publishes; it goes with the
# set a day after the conversation's last join.
_WATCHERS_TTL_S = 86_400


class RedisBroker:
    name = "redis"

    def __init__(
        self,
        redis: Redis | RedisCluster,
        *,
        server_id: str,
        prefix: str = "chat",
        cluster: bool = False,
        max_queued: int = 10_000,
        on_gap: Callable[[], None] | None = None,
        on_control: OnControl | None = None,
    ) -> None:
        self._redis = redis
        self.server_id = server_id
        self._prefix = prefix
        self._cluster = cluster
        self._max_queued = max_queued
        self.on_gap = on_gap
        self.on_control = on_control
        self._deliver: Deliver | None = None
        # One subscriber connection; on a cluster one per node owning our channels, each
        # read by its own task (redis-py's cluster pub/sub polls node after node).
        self._subscribers: dict[str, Subscriber] = {}
        # Conversations subscribed, by id: a reply's deltas ask per delta, no name to build.
        self._subscribed: set[str] = set()
        self._outgoing: deque[tuple[str, bytes]] = deque()
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._writer: asyncio.Task[None] | None = None
        self._conn: AbstractConnection | None = None  # the writer's own, plain Redis only
        self._last_gap = 0.0
        self.received = 0
        self.dropped_echoes = 0
        self._own_event = own_event_test(server_id)
        self.gaps = 0
        self._control_name = self.control_channel(server_id).encode()

    # -- names --------------------------------------------------------------------------

    def channel(self, conversation_id: str) -> str:
        return conversation_keys(self._prefix, conversation_id).events

    def control_channel(self, server_id: str) -> str:
        return control_channel_name(self._prefix, server_id)

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self, deliver: Deliver) -> None:
        self._deliver = deliver
        self._writer = asyncio.create_task(self._publish_loop(), name="broker-writer")
        await self._subscriber_for(self._control_name).subscribe(self._control_name)

    async def close(self) -> None:
        # What was published last (a reply's gen_end at shutdown) must still go out.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _FLUSH_ON_CLOSE_S
        while self._outgoing and self._writer is not None and not self._writer.done():
            if loop.time() > deadline:
                log.warning("closing with %d frames unpublished", len(self._outgoing))
                break
            self._room.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._room.wait(), 0.05)
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._writer, 5)
        if self._conn is not None and isinstance(self._redis, Redis):
            conn, self._conn = self._conn, None
            await self._redis.connection_pool.release(conn)
        for subscriber in self._subscribers.values():
            await subscriber.close()
        if self._cluster:
            for subscriber in self._subscribers.values():
                with contextlib.suppress(Exception):
                    await subscriber._client.aclose()
        self._subscribers.clear()
        self._deliver = None

    def healthy(self) -> bool:
        return bool(self._subscribers) and all(s.connected for s in self._subscribers.values())

    def _subscriber_for(self, name: bytes) -> Subscriber:
        if isinstance(self._redis, RedisCluster):
            node = self._redis.get_node_from_key(name.decode())
            if node is None:
                raise BrokerUnavailable("no cluster node owns this channel")
            key, client = node.name, None
            if key not in self._subscribers:
                client = Redis(host=node.host, port=int(node.port))
        else:
            key, client = "", self._redis
        subscriber = self._subscribers.get(key)
        if subscriber is None:
            assert client is not None
            subscriber = Subscriber(
                client, sharded=self._cluster, on_message=self._handle, on_gap=self._gap
            )
            subscriber.start()
            self._subscribers[key] = subscriber
        return subscriber

    def _gap(self) -> None:
        now = time.monotonic()
        if now - self._last_gap < _GAP_DEBOUNCE_S:
            return
        self._last_gap = now
        self.gaps += 1
        if self.on_gap is not None:
            self.on_gap()

    # -- subscriptions ------------------------------------------------------------------

    async def subscribe(self, conversation_id: str) -> None:
        name = self.channel(conversation_id).encode()
        self._subscribed.add(conversation_id)
        try:
            await self._subscriber_for(name).subscribe(name)
            # After the subscription is live: an owner that sees us in the set publishes,
            # and what it publishes reaches us. Before a join reads its snapshot.
            watchers = conversation_keys(self._prefix, conversation_id).watchers
            pipe = self._redis.pipeline(transaction=False)
            pipe.sadd(watchers, self.server_id)
            pipe.expire(watchers, _WATCHERS_TTL_S)
            await pipe.execute()
        except BaseException:
            self._subscribed.discard(conversation_id)
            raise

    async def unsubscribe(self, conversation_id: str) -> None:
        if conversation_id not in self._subscribed:
            return
        self._subscribed.discard(conversation_id)
        name = self.channel(conversation_id).encode()
        try:
            # A failure here leaves a stale entry: needless publishes, nothing lost.
            watchers = conversation_keys(self._prefix, conversation_id).watchers
            await self._redis.srem(watchers, self.server_id)
        finally:
            await self._subscriber_for(name).unsubscribe(name)

    # -- publishing ---------------------------------------------------------------------

    async def publish(self, event: Event) -> None:
        await self.publish_many((event,))

    async def publish_many(self, events: Sequence[Event]) -> None:
        """``publish`` each event in order, with one wait for room and one wake.

        The queue's bound is checked once for the whole batch (a loop pass's deltas, at
        most one per running reply), so it may pass its bound by a batch. The other
        instances get the publication time (their fan-out delay is measured); local
        members get the events as they are: a reply's deltas come unstamped, delivered in
        this call, their delay is nil by construction (see MemoryBroker.publish_many).
        """
        if not events:
            return
        await self._wait_room()
        # Queued for Redis before the local delivery, in one step with no await between:
        # the writer task is woken ahead of the local flush, so the PUBLISH leaves before
        # this instance spends milliseconds writing to its own members, and the other
        # instances fan out in parallel with it. Same order locally as through Redis.
        server_id, outgoing, subscribed = self.server_id, self._outgoing, self._subscribed
        now = time.time()
        local: list[Event] = []
        for event in events:
            cid = event.conversation_id
            payload = Envelope(server_id, event.published_at or now, cid, event.frame).pack()
            outgoing.append((self.channel(cid), payload))
            if cid in subscribed:
                local.append(event)
        self._wake.set()
        deliver = self._deliver
        if deliver is not None:
            for event in local:
                deliver(event)

    def deliver_local(self, events: Sequence[Event]) -> None:
        deliver_subscribed(self._deliver, self._subscribed, events)

    async def send_control(self, server_id: str, message: Control) -> None:
        """A message for one instance (e.g. cancel a reply it owns)."""
        payload = ControlEnvelope(self.server_id, message).pack()
        await self._enqueue(self.control_channel(server_id), payload)

    async def announce(self, conversation_id: str, message: Control) -> None:
        """Queued behind the conversation's events already queued: in their order."""
        payload = ControlEnvelope(self.server_id, message).pack()
        await self._enqueue(self.channel(conversation_id), payload)

    async def _enqueue(self, channel: str, payload: bytes) -> None:
        await self._wait_room()
        self._outgoing.append((channel, payload))
        self._wake.set()

    async def _wait_room(self) -> None:
        while len(self._outgoing) >= self._max_queued:
            self._room.clear()
            await self._room.wait()

    async def _publish_loop(self) -> None:
        retry = 0
        me = asyncio.current_task()
        assert me is not None
        while True:
            if me.cancelling():
                # redis-py can swallow a cancel that lands inside a pipeline's retry.
                raise asyncio.CancelledError
            await self._wake.wait()
            self._wake.clear()
            while self._outgoing and not me.cancelling():
                batch = [self._outgoing[i] for i in range(min(len(self._outgoing), 1000))]
                try:
                    if isinstance(self._redis, Redis) and not self._cluster:
                        await self._publish_direct(self._redis, batch)
                    else:
                        pipe = self._redis.pipeline(transaction=False)
                        for channel, payload in batch:
                            if self._cluster:
                                pipe.spublish(channel, payload)
                            else:
                                pipe.publish(channel, payload)
                        await pipe.execute()
                except (RedisError, OSError) as exc:
                    retry += 1
                    delay = RECONNECT.delay(retry)
                    log.warning("publish failed, retrying in %.2fs: %s", delay, exc)
                    await asyncio.sleep(delay)
                    continue
                retry = 0
                for _ in batch:
                    self._outgoing.popleft()
                if len(self._outgoing) < self._max_queued:
                    self._room.set()

    async def _publish_direct(self, redis: Redis, batch: list[tuple[str, bytes]]) -> None:
        """The batch's PUBLISHes on a connection of our own, written before the first await.

        A pooled command or pipeline first checks the connection it takes out with a read
        that yields to the loop: the local flush (milliseconds of writes to this instance's
        members) would run before the PUBLISH leaves, and every other instance would start
        its fan-out that much later. Written here, the PUBLISH goes out in the same loop pass
        as the writer wakes, ahead of the flush.
        """
        conn = self._conn
        if conn is None:
            pool = redis.connection_pool
            conn = self._conn = await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            packed = pack_commands(
                conn, [("PUBLISH", channel, payload) for channel, payload in batch]
            )
            await conn.send_packed_command(packed, check_health=False)
            # One timer for the batch's replies: redis-py arms one around every read.
            async with asyncio.timeout(conn.socket_timeout):
                for _ in batch:
                    await conn.read_response(timeout=math.inf)
        except BaseException:
            # Replies may be left unread on it: never reuse it.
            self._conn = None
            with contextlib.suppress(Exception):
                await conn.disconnect()
            await redis.connection_pool.release(conn)
            raise

    # -- receiving ----------------------------------------------------------------------

    def _handle(self, channel: bytes, data: bytes) -> None:
        if self._own_event(data):
            self.dropped_echoes += 1  # delivered locally at publish time; not even unpacked
            return
        envelope = unpack(data)
        if envelope is None:
            log.warning("undecodable broker payload on %r", channel)
            return
        if isinstance(envelope, ControlEnvelope):
            if self.on_control is not None:
                self.on_control(envelope.control)
            return
        if envelope.origin == self.server_id:
            self.dropped_echoes += 1  # already delivered locally at publish time
            return
        self.received += 1
        if self._deliver is not None:
            self._deliver(Event(envelope.conversation_id, envelope.frame, envelope.published_at))
