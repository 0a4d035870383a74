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
import random
from collections import deque
from collections.abc import Callable
from typing import Any

import msgpack
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from ..events import Event
from .base import BrokerUnavailable, Control, Deliver

log = logging.getLogger("chatserver.broker.redis")

_SUBSCRIBE_TIMEOUT_S = 5.0
_BACKOFF_MAX_S = 5.0


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
        on_control: Control | None = None,
    ) -> None:
        self._redis = redis
        self.server_id = server_id
        self._prefix = prefix
        self._cluster = cluster
        self._max_queued = max_queued
        self.on_gap = on_gap
        self.on_control = on_control
        self._deliver: Deliver | None = None
        self._pubsub: Any = None
        self._channels: dict[bytes, str] = {}  # subscribed channel -> conversation id
        self._confirm: dict[bytes, asyncio.Future[None]] = {}
        self._outgoing: deque[tuple[str, bytes]] = deque()
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._connected = False
        self._reader: asyncio.Task[None] | None = None
        self._writer: asyncio.Task[None] | None = None
        self.received = 0
        self.dropped_echoes = 0

    # -- names --------------------------------------------------------------------------

    def channel(self, conversation_id: str) -> str:
        return f"{self._prefix}:{{{conversation_id}}}:events"

    def control_channel(self, server_id: str) -> str:
        return f"{self._prefix}:{{ctl-{server_id}}}:control"

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self, deliver: Deliver) -> None:
        self._deliver = deliver
        await self._connect()
        self._reader = asyncio.create_task(self._read_loop(), name="broker-reader")
        self._writer = asyncio.create_task(self._publish_loop(), name="broker-writer")

    async def close(self) -> None:
        for task in (self._reader, self._writer):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await asyncio.wait_for(task, 5)
        await self._drop_pubsub()
        self._deliver = None

    def healthy(self) -> bool:
        return self._connected

    async def _connect(self) -> None:
        """A fresh subscriber connection with the control channel and every room."""
        await self._drop_pubsub()
        self._pubsub = self._redis.pubsub()
        wanted = [self.control_channel(self.server_id).encode(), *self._channels]
        for name in wanted:
            await self._subscribe_raw(name)
        # Confirmations are read by the reader loop; at start we read them here.
        pending = {n: self._expect_confirmation(n) for n in wanted}
        if self._reader is None or self._reader.done():
            await self._pump_until(pending)
        self._connected = True

    async def _drop_pubsub(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        self._connected = False
        if pubsub is not None:
            with contextlib.suppress(Exception):
                await pubsub.aclose()

    async def _subscribe_raw(self, name: bytes) -> None:
        if self._cluster:
            await self._pubsub.ssubscribe(name)
        else:
            await self._pubsub.subscribe(name)

    def _expect_confirmation(self, name: bytes) -> asyncio.Future[None]:
        future = self._confirm.get(name)
        if future is None or future.done():
            future = asyncio.get_running_loop().create_future()
            self._confirm[name] = future
        return future

    async def _pump_until(self, pending: dict[bytes, asyncio.Future[None]]) -> None:
        deadline = asyncio.get_running_loop().time() + _SUBSCRIBE_TIMEOUT_S
        while not all(f.done() for f in pending.values()):
            if asyncio.get_running_loop().time() > deadline:
                raise BrokerUnavailable("Redis did not confirm the subscriptions")
            message = await self._next_message(timeout=0.5)
            if message is not None:
                self._handle(message)

    # -- subscriptions ------------------------------------------------------------------

    async def subscribe(self, conversation_id: str) -> None:
        name = self.channel(conversation_id).encode()
        self._channels[name] = conversation_id
        if not self._connected or self._pubsub is None:
            raise BrokerUnavailable("not connected to Redis")
        future = self._expect_confirmation(name)
        try:
            await self._subscribe_raw(name)
            await asyncio.wait_for(asyncio.shield(future), _SUBSCRIBE_TIMEOUT_S)
        except (RedisError, OSError, TimeoutError) as exc:
            self._channels.pop(name, None)
            raise BrokerUnavailable(f"subscribe failed: {exc}") from None

    async def unsubscribe(self, conversation_id: str) -> None:
        name = self.channel(conversation_id).encode()
        if self._channels.pop(name, None) is None or self._pubsub is None:
            return
        with contextlib.suppress(RedisError, OSError):
            if self._cluster:
                await self._pubsub.sunsubscribe(name)
            else:
                await self._pubsub.unsubscribe(name)

    # -- publishing ---------------------------------------------------------------------

    async def publish(self, event: Event) -> None:
        channel = self.channel(event.conversation_id)
        if self._deliver is not None and channel.encode() in self._channels:
            self._deliver(event)  # local members first, no Redis round trip
        payload = msgpack.packb(
            [self.server_id, event.published_at, event.conversation_id, event.frame],
            use_bin_type=True,
        )
        await self._enqueue(channel, payload)

    async def send_control(self, server_id: str, message: dict[str, Any]) -> None:
        """A message for one instance (e.g. cancel a reply it owns)."""
        payload = msgpack.packb([self.server_id, 0.0, None, message], use_bin_type=True)
        await self._enqueue(self.control_channel(server_id), payload)

    async def _enqueue(self, channel: str, payload: bytes) -> None:
        while len(self._outgoing) >= self._max_queued:
            self._room.clear()
            await self._room.wait()
        self._outgoing.append((channel, payload))
        self._wake.set()

    async def _publish_loop(self) -> None:
        backoff = 0.05
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
                    pipe = self._redis.pipeline(transaction=False)
                    for channel, payload in batch:
                        if self._cluster:
                            pipe.spublish(channel, payload)
                        else:
                            pipe.publish(channel, payload)
                    await pipe.execute()
                except (RedisError, OSError) as exc:
                    log.warning("publish failed, retrying in %.2fs: %s", backoff, exc)
                    await asyncio.sleep(backoff + random.uniform(0, backoff))
                    backoff = min(backoff * 2, _BACKOFF_MAX_S)
                    continue
                backoff = 0.05
                for _ in batch:
                    self._outgoing.popleft()
                if len(self._outgoing) < self._max_queued:
                    self._room.set()

    # -- receiving ----------------------------------------------------------------------

    async def _next_message(self, timeout: float | None) -> dict[str, Any] | None:
        if self._cluster:
            message: dict[str, Any] | None = await self._pubsub.get_sharded_message(
                timeout=timeout if timeout is not None else 1.0
            )
            return message
        return await self._pubsub.get_message(timeout=timeout)  # type: ignore[no-any-return]

    async def _read_loop(self) -> None:
        backoff = 0.05
        while True:
            try:
                if self._pubsub is None or not self._connected:
                    await self._connect()
                    log.warning("reconnected to Redis pub/sub; asking clients to rejoin")
                    backoff = 0.05
                    if self.on_gap is not None:
                        self.on_gap()
                message = await self._next_message(timeout=None if not self._cluster else 1.0)
                if message is not None:
                    self._handle(message)
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError, BrokerUnavailable) as exc:
                if self._connected:
                    log.warning("Redis pub/sub connection lost: %s", exc)
                self._connected = False
                await asyncio.sleep(backoff + random.uniform(0, backoff))
                backoff = min(backoff * 2, _BACKOFF_MAX_S)

    def _handle(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if isinstance(kind, bytes):
            kind = kind.decode()
        channel = message.get("channel")
        if isinstance(channel, str):
            channel = channel.encode()
        if kind in ("subscribe", "ssubscribe"):
            future = self._confirm.pop(channel, None) if channel is not None else None
            if future is not None and not future.done():
                future.set_result(None)
            return
        if kind not in ("message", "smessage"):
            return
        try:
            origin, published_at, conversation_id, frame = msgpack.unpackb(
                message["data"], raw=False
            )
        except Exception:
            log.warning("undecodable broker payload on %r", channel)
            return
        if conversation_id is None:
            if self.on_control is not None and isinstance(frame, dict):
                self.on_control(frame)
            return
        if origin == self.server_id:
            self.dropped_echoes += 1  # already delivered locally at publish time
            return
        self.received += 1
        if self._deliver is not None:
            self._deliver(Event(conversation_id, frame, published_at))
