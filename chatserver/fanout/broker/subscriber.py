"""One Redis pub/sub connection and the task that serves it.

What the connection hands over (``_handle``) resolves subscribe confirmations (so a join
can wait until its channel is live) and passes data messages on; the task survives the
connection: redis-py may reconnect and resubscribe by itself (we see a confirmation nobody
asked for), or the connection is lost (we reconnect with capped backoff and resubscribe).
Either way messages were missed: ``on_gap``. The connection itself is pubsub_conn.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from redis.asyncio import Redis
from redis.exceptions import RedisError

from protocol.backoff import Backoff

from .base import BrokerUnavailable
from .pubsub_conn import PubSubConnection, PubSubItem, pubsub_connection

log = logging.getLogger("chatserver.broker.redis")

SUBSCRIBE_TIMEOUT_S = 5.0
RECONNECT = Backoff(0.05, 5.0)  # reconnecting the pub/sub connection
HEALTH_CHECK_S = 15.0  # silent this long, the connection is asked a PING


class Subscriber:
    def __init__(
        self,
        client: Redis,
        *,
        sharded: bool,
        on_message: Callable[[bytes, bytes], None],
        on_gap: Callable[[], None],
    ) -> None:
        self._client = client
        self._sharded = sharded  # SSUBSCRIBE on a cluster node
        self._on_message = on_message
        self._on_gap = on_gap
        self._pubsub: PubSubConnection | None = None
        self.channels: set[bytes] = set()
        self._confirm: dict[bytes, asyncio.Future[None]] = {}
        self._has_channels = asyncio.Event()
        self.connected = False
        self._reader: asyncio.Task[None] | None = None

    def _open(self) -> PubSubConnection:
        return pubsub_connection(
            self._client, sharded=self._sharded, health_s=HEALTH_CHECK_S, handle=self._handle
        )

    def start(self) -> None:
        self._pubsub = self._open()
        self.connected = True
        self._reader = asyncio.create_task(self._read_loop(), name="broker-subscriber")

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._reader, 5)
        await self._drop()

    async def _drop(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        self.connected = False
        if pubsub is not None:
            with contextlib.suppress(Exception):
                await pubsub.close()

    async def subscribe(self, name: bytes) -> None:
        """Return once Redis confirmed the subscription: later publications will arrive."""
        self.channels.add(name)
        if self._pubsub is None or not self.connected:
            raise BrokerUnavailable("not connected to Redis")
        future = self._expect(name)
        try:
            await self._send("subscribe", name)
            self._has_channels.set()
            await asyncio.wait_for(asyncio.shield(future), SUBSCRIBE_TIMEOUT_S)
        except (RedisError, OSError, TimeoutError) as exc:
            self.channels.discard(name)
            self._confirm.pop(name, None)
            raise BrokerUnavailable(f"subscribe failed: {exc}") from None

    async def unsubscribe(self, name: bytes) -> None:
        self.channels.discard(name)
        if self._pubsub is None:
            return
        with contextlib.suppress(RedisError, OSError):
            await self._send("unsubscribe", name)

    async def _send(self, verb: str, name: bytes) -> None:
        if self._pubsub is None:
            raise BrokerUnavailable("not connected to Redis")
        await self._pubsub.send(verb, name)

    def _expect(self, name: bytes) -> asyncio.Future[None]:
        future = self._confirm.get(name)
        if future is None or future.done():
            future = asyncio.get_running_loop().create_future()
            self._confirm[name] = future
        return future

    async def _reconnect(self) -> None:
        await self._drop()
        self._pubsub = self._open()
        for name in list(self.channels):
            self._expect(name)
            await self._send("subscribe", name)
        self.connected = True
        log.warning("Redis pub/sub reconnected and resubscribed; clients rejoin")
        self._on_gap()

    async def _read_loop(self) -> None:
        retry = 0
        while True:
            await self._has_channels.wait()
            try:
                if self._pubsub is None or not self.connected:
                    await self._reconnect()
                    retry = 0
                assert self._pubsub is not None
                await self._pubsub.serve()  # hands every item to _handle as it comes
            except asyncio.CancelledError:
                raise
            except RuntimeError:  # no subscription left on this connection
                self._has_channels.clear()
            except (RedisError, OSError, BrokerUnavailable) as exc:
                if self.connected:
                    log.warning("Redis pub/sub connection lost: %s", exc)
                self.connected = False
                retry += 1
                await asyncio.sleep(RECONNECT.delay(retry))

    def _handle(self, item: PubSubItem) -> None:
        kind, channel, data = item
        if kind in (b"message", b"smessage"):
            self._on_message(channel, data)
            return
        if kind in (b"subscribe", b"ssubscribe"):
            future = self._confirm.pop(channel, None)
            if future is not None and not future.done():
                future.set_result(None)
            elif channel in self.channels:
                # redis-py reconnected and resubscribed on its own: messages were missed.
                log.warning("Redis pub/sub resubscribed after a reconnect; clients rejoin")
                self._on_gap()
