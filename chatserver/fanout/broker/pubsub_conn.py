"""The connection a subscriber reads: redis-py's ``PubSub``, or a lean one of our own.

redis-py's ``PubSub`` hands over one message per call, through six coroutines, a health
check, RESP3 push handling and a debug line formatted for every message (logged or not).
Every message published to a conversation reaches every instance with a member in it, its
publisher's included, so that path was 5% of an instance's CPU under a fan-out load.

:class:`LeanPubSub` speaks RESP2 on a socket of its own: what one read brings is fed to
hiredis at once and every complete message handed over before the next read. It serves a
standalone Redis over TCP or a Unix socket. A TLS connection (``rediss://``), a credential
provider, and a cluster's sharded channels keep redis-py's (:class:`RedisPyPubSub`).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Protocol

import hiredis
from redis.asyncio import Redis
from redis.asyncio.connection import Connection, UnixDomainSocketConnection

# (kind, channel, data): kind b"message", b"subscribe", b"unsubscribe" (s-prefixed sharded).
PubSubItem = tuple[bytes, bytes, Any]

CONNECT_TIMEOUT_S = 5.0
READ_SIZE = 65536


def _pack(*args: Any) -> bytes:
    packed: bytes = hiredis.pack_command(args)
    return packed


class PubSubConnection(Protocol):
    async def send(self, verb: str, name: bytes) -> None:
        """``subscribe`` or ``unsubscribe`` one channel (connecting first if need be)."""

    async def read(self) -> list[PubSubItem]:
        """What has arrived, at least one item (raises on a lost connection)."""

    async def close(self) -> None: ...


def pubsub_connection(client: Redis, *, sharded: bool, health_s: float) -> PubSubConnection:
    """The leanest connection that reaches ``client``'s server (module docstring)."""
    pool = client.connection_pool
    kwargs = pool.connection_kwargs
    if not sharded and kwargs.get("credential_provider") is None:
        if pool.connection_class is Connection:
            address = (kwargs.get("host", "localhost"), int(kwargs.get("port", 6379)))
            return LeanPubSub(address, None, kwargs, health_s)
        if pool.connection_class is UnixDomainSocketConnection:
            return LeanPubSub(None, kwargs["path"], kwargs, health_s)
    return RedisPyPubSub(client, sharded=sharded)


class RedisPyPubSub:
    def __init__(self, client: Redis, *, sharded: bool) -> None:
        self._pubsub: Any = client.pubsub()
        self._prefix = "s" if sharded else ""  # SSUBSCRIBE on a cluster node

    async def send(self, verb: str, name: bytes) -> None:
        await getattr(self._pubsub, self._prefix + verb)(name)

    async def read(self) -> list[PubSubItem]:
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
            return [(kind, channel, message.get("data"))]

    async def close(self) -> None:
        await self._pubsub.aclose()


class LeanPubSub:
    """RESP2 pub/sub on its own socket (module docstring). A watch every ``health_s``: read
    from and silent since the last one, it asks Redis a PING; still silent at the next one,
    the connection counts as lost. One timer per interval, not one per read: under load a
    subscriber reads thousands of times a second."""

    def __init__(
        self,
        address: tuple[str, int] | None,
        path: str | None,
        kwargs: dict[str, Any],
        health_s: float,
    ) -> None:
        self._address = address
        self._path = path
        self._username: str | None = kwargs.get("username")
        self._password: str | None = kwargs.get("password")
        self._connect_timeout = kwargs.get("socket_connect_timeout") or CONNECT_TIMEOUT_S
        self._health_s = health_s
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._parser = hiredis.Reader()
        self._connecting: asyncio.Lock | None = None
        self._watch: asyncio.TimerHandle | None = None
        self._reading = False  # waiting for bytes from Redis
        self._heard = False  # bytes came (or a read began) since the last watch
        self._pinged = False
        self._silent = False  # the watch gave the connection up

    async def _connected(self) -> asyncio.StreamWriter:
        if self._writer is not None:
            return self._writer
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._writer is None:
                async with asyncio.timeout(self._connect_timeout):
                    await self._connect()
        assert self._writer is not None
        return self._writer

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
        self._parser = hiredis.Reader()
        self._reader, self._writer = reader, writer
        self._heard, self._pinged, self._silent = True, False, False
        self._watch = asyncio.get_running_loop().call_later(self._health_s, self._watched)

    def _watched(self) -> None:
        writer = self._writer
        if writer is None:
            return
        if self._heard or not self._reading:
            self._heard = self._pinged = False
        elif not self._pinged:
            writer.write(_pack("PING"))
            self._pinged = True
        else:
            self._silent = True
            writer.transport.abort()  # the read ends: no bytes more
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
        writer = await self._connected()
        writer.write(_pack(verb.upper(), name))
        await writer.drain()

    async def read(self) -> list[PubSubItem]:
        await self._connected()
        parser = self._parser
        items: list[PubSubItem] = []
        while True:
            item = parser.gets()
            if item is False:
                if items:
                    return items
                parser.feed(await self._read_some())
                continue
            if isinstance(item, hiredis.ReplyError):
                raise ConnectionError(f"Redis pub/sub error: {item}")
            if isinstance(item, list) and len(item) == 3:  # a PONG is ["pong", ""]
                items.append((item[0], item[1], item[2]))

    async def _read_some(self) -> bytes:
        reader = self._reader
        assert reader is not None
        self._reading = self._heard = True
        try:
            data = await reader.read(READ_SIZE)
        finally:
            self._reading = False
        if not data:
            if self._silent:
                raise ConnectionError("Redis did not answer a pub/sub PING")
            raise ConnectionError("Redis closed the pub/sub connection")
        self._heard = True
        return data

    async def close(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
