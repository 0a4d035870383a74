"""The connection a subscriber reads: redis-py's ``PubSub``, or a lean one of our own.

Either hands every item that arrives to the handler it was made with, in order, and its
``serve`` raises when the connection is lost. Ours hands items over as they arrive, from the
moment it is connected; redis-py's only while ``serve`` runs (it reads them there).

redis-py's ``PubSub`` hands over one message per call, through six coroutines, a health
check, RESP3 push handling and a debug line formatted for every message (logged or not).
Every message published to a conversation reaches every instance with a member in it, its
publisher's included, so that path was 5% of an instance's CPU under a fan-out load.

:class:`LeanPubSub` speaks RESP2 on a socket of its own and is that socket's protocol: the
bytes Redis sends are fed to hiredis in the loop's callback that receives them, and every
complete message is handed over there, with no task woken, no future and no copy per read
(that wake-up was most of what a subscriber cost per read, and a loop pass of every
delivery's latency). It serves a standalone Redis over TCP or a Unix socket. A TLS connection
(``rediss://``), a credential provider, and a cluster's sharded channels keep redis-py's
(:class:`RedisPyPubSub`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any, Protocol, cast

import hiredis
from redis.asyncio import Redis
from redis.asyncio.connection import Connection, UnixDomainSocketConnection

log = logging.getLogger("chatserver.broker.redis")

# (kind, channel, data): kind b"message", b"subscribe", b"unsubscribe" (s-prefixed sharded).
PubSubItem = tuple[bytes, bytes, Any]
Handle = Callable[[PubSubItem], None]

CONNECT_TIMEOUT_S = 5.0
READ_SIZE = 65536


def _pack(*args: Any) -> bytes:
    packed: bytes = hiredis.pack_command(args)
    return packed


def _hand_over(handle: Handle, item: PubSubItem) -> None:
    try:
        handle(item)
    except Exception:  # one bad message must not cost the connection
        log.exception("a pub/sub message could not be handled")


class PubSubConnection(Protocol):
    async def send(self, verb: str, name: bytes) -> None:
        """``subscribe`` or ``unsubscribe`` one channel (connecting first if need be)."""

    async def serve(self) -> None:
        """Hand what arrives to the handler (connecting first if need be) until the
        connection is lost, and raise then (``ConnectionError``, or redis-py's errors;
        redis-py's ``RuntimeError`` when no channel is left on it)."""

    async def close(self) -> None: ...


def pubsub_connection(
    client: Redis, *, sharded: bool, health_s: float, handle: Handle
) -> PubSubConnection:
    """The leanest connection that reaches ``client``'s server (module docstring)."""
    pool = client.connection_pool
    kwargs = pool.connection_kwargs
    if not sharded and kwargs.get("credential_provider") is None:
        if pool.connection_class is Connection:
            address = (kwargs.get("host", "localhost"), int(kwargs.get("port", 6379)))
            return LeanPubSub(address, None, kwargs, health_s, handle)
        if pool.connection_class is UnixDomainSocketConnection:
            return LeanPubSub(None, kwargs["path"], kwargs, health_s, handle)
    return RedisPyPubSub(client, sharded=sharded, handle=handle)


class RedisPyPubSub:
    def __init__(self, client: Redis, *, sharded: bool, handle: Handle) -> None:
        self._pubsub: Any = client.pubsub()
        self._prefix = "s" if sharded else ""  # SSUBSCRIBE on a cluster node
        self._handle = handle

    async def send(self, verb: str, name: bytes) -> None:
        await getattr(self._pubsub, self._prefix + verb)(name)

    async def serve(self) -> None:
        while True:  # raises RuntimeError when no channel is left on it
            message = await self._pubsub.get_message(timeout=None)
            if message is None:
                continue
            kind, channel = message.get("type"), message.get("channel")
            if isinstance(kind, str):
                kind = kind.encode()
            if isinstance(channel, str):
                channel = channel.encode()
            if kind is None or channel is None:
                continue
            _hand_over(self._handle, (kind, channel, message.get("data")))

    async def close(self) -> None:
        await self._pubsub.aclose()


class LeanPubSub(asyncio.Protocol):
    """RESP2 pub/sub on its own socket, whose protocol it is once connected (module
    docstring). A watch every ``health_s``: served and silent since the last one, it asks
    Redis a PING; still silent at the next one, the connection counts as lost. One timer
    per interval, not one per read: under load a subscriber reads thousands of times a
    second."""

    def __init__(
        self,
        address: tuple[str, int] | None,
        path: str | None,
        kwargs: dict[str, Any],
        health_s: float,
        handle: Handle,
    ) -> None:
        self._address = address
        self._path = path
        self._username: str | None = kwargs.get("username")
        self._password: str | None = kwargs.get("password")
        self._connect_timeout = kwargs.get("socket_connect_timeout") or CONNECT_TIMEOUT_S
        self._health_s = health_s
        self._handle = handle
        self._transport: asyncio.Transport | None = None
        # Held while connected: a stream writer collected closes its transport.
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._lost: asyncio.Future[None] | None = None  # done when the socket is gone
        self._error: str | None = None  # why this side gave the connection up
        self._parser = hiredis.Reader()
        self._connecting: asyncio.Lock | None = None
        self._watch: asyncio.TimerHandle | None = None
        self._serving = False  # waiting for bytes from Redis
        self._heard = False  # bytes came (or serving began) since the last watch
        self._pinged = False
        self._silent = False  # the watch gave the connection up

    async def _connected(self) -> asyncio.Transport:
        if self._lost is not None and self._lost.done():
            raise ConnectionError("the pub/sub connection is lost")
        if self._transport is not None:
            return self._transport
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._transport is None:
                async with asyncio.timeout(self._connect_timeout):
                    await self._connect()
        assert self._transport is not None
        return self._transport

    async def _connect(self) -> None:
        if self._path is not None:
            reader, writer = await asyncio.open_unix_connection(self._path)
        else:
            assert self._address is not None
            reader, writer = await asyncio.open_connection(*self._address)
        if self._password is not None:
            try:
                await self._auth(reader, writer, self._password)
            except BaseException:
                writer.close()
                raise
        # From here on the bytes come to ``data_received``; nothing was asked after AUTH's
        # answer, so the stream reader holds none.
        transport = cast(asyncio.Transport, writer.transport)
        self._parser = hiredis.Reader()
        self._lost = asyncio.get_running_loop().create_future()
        transport.set_protocol(self)
        self._transport, self._streams = transport, (reader, writer)
        self._heard, self._pinged, self._silent = True, False, False
        self._watch = asyncio.get_running_loop().call_later(self._health_s, self._watched)

    def _watched(self) -> None:
        transport = self._transport
        if transport is None:
            return
        if self._heard or not self._serving:
            self._heard = self._pinged = False
        elif not self._pinged:
            transport.write(_pack("PING"))
            self._pinged = True
        else:
            self._silent = True
            transport.abort()  # serving ends: no bytes more
            return
        self._watch = asyncio.get_running_loop().call_later(self._health_s, self._watched)

    async def _auth(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, password: str
    ) -> None:
        user = (self._username,) if self._username else ()
        writer.write(_pack("AUTH", *user, password))
        parser = hiredis.Reader()
        reply: Any = False
        while reply is False:
            data = await reader.read(READ_SIZE)
            if not data:
                raise ConnectionError("Redis closed the connection during AUTH")
            parser.feed(data)
            reply = parser.gets()
        if isinstance(reply, hiredis.ReplyError):
            raise ConnectionError(f"Redis refused AUTH: {reply}")

    async def send(self, verb: str, name: bytes) -> None:
        transport = await self._connected()
        transport.write(_pack(verb.upper(), name))  # a few bytes: never held for long

    async def serve(self) -> None:
        await self._connected()
        lost = self._lost
        assert lost is not None
        self._serving = self._heard = True
        try:
            await asyncio.shield(lost)
        finally:
            self._serving = False
        if self._silent:
            raise ConnectionError("Redis did not answer a pub/sub PING")
        raise ConnectionError(self._error or "Redis closed the pub/sub connection")

    async def close(self) -> None:
        transport, self._transport, self._streams = self._transport, None, None
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        if transport is not None:
            transport.close()
            if self._lost is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(asyncio.shield(self._lost), CONNECT_TIMEOUT_S)

    # -- asyncio.Protocol ------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self._heard = True
        parser = self._parser
        parser.feed(data)
        handle = self._handle
        while True:
            try:
                item = parser.gets()
            except hiredis.ProtocolError as exc:  # nothing after it can be trusted
                self._give_up(f"protocol error from Redis pub/sub: {exc!r}")
                return
            if item is False:
                return
            if isinstance(item, hiredis.ReplyError):
                self._give_up(f"Redis pub/sub error: {item}")
                return
            if isinstance(item, list) and len(item) == 3:  # a PONG is ["pong", ""]
                _hand_over(handle, (item[0], item[1], item[2]))

    def connection_lost(self, exc: Exception | None) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        lost = self._lost
        if lost is not None and not lost.done():
            lost.set_result(None)

    def _give_up(self, reason: str) -> None:
        self._error = reason
        if self._transport is not None:
            self._transport.abort()
