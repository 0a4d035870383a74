"""One connection that carries the tick batches and reads their replies as they arrive.

redis-py reads a reply through a coroutine per command under a task per batch: the bytes
arrive in one pass of the event loop, the task that parses them runs in the next, and the
callers waiting on them in the one after. Every Redis round trip on the way to an ack or a
first token waited that pass more, and under load a pass of the loop lasts milliseconds.

:class:`ReplyLane` takes over a connection redis-py opened (its handshake, AUTH, TLS and
``SELECT`` done), as the protocol of its transport: the bytes that arrive are fed to hiredis
at once, each reply goes through the client's response callback and resolves its command's
future in the same callback. Replies come back in the order commands were written, so one
lane carries every batch, in order, without waiting for the one before (pipelined).

Should the connection be lost (or a reply take longer than the socket timeout, when one is
set), the commands not answered yet go back to the client, which sends them again the way
it sends any batch, with its retries; the lane is then replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections import deque
from collections.abc import Callable, MutableMapping, Sequence
from typing import Any

import hiredis
from redis._parsers.base import BaseParser
from redis.client import EMPTY_RESPONSE, NEVER_DECODE
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse
from redis.exceptions import TimeoutError as RedisTimeoutError

# (args, options, future) of one command: what the client queues per tick.
Pending = tuple[tuple[Any, ...], dict[str, Any], "asyncio.Future[Any]"]
Callbacks = MutableMapping[Any, Any]  # command name -> redis-py's response callback
# The lane lost, its commands not answered yet (in order), and why it was lost.
OnLost = Callable[["ReplyLane", list[Pending], BaseException], None]


class ReplyLane(asyncio.Protocol):
    """The protocol of a connection taken from redis-py (module docstring)."""

    def __init__(
        self,
        conn: Any,
        callbacks: Callbacks,
        on_lost: OnLost,
        timeout_s: float | None,
    ) -> None:
        self.conn = conn
        self._callbacks = callbacks
        self._on_lost = on_lost
        self._timeout_s = timeout_s
        self._parser = hiredis.Reader(
            protocolError=InvalidResponse, replyError=BaseParser.parse_error
        )
        self._pending: deque[Pending] = deque()
        self._transport: asyncio.Transport = conn._writer.transport
        self._timer: asyncio.TimerHandle | None = None
        self._answered = 0  # replies read so far: the timer checks that they move
        self._drain_waiters: list[asyncio.Future[None]] = []
        self.lost = False
        self.paused = False  # the socket's buffer is full: batches take other connections
        self._transport.set_protocol(self)

    @property
    def usable(self) -> bool:
        return not self.lost and not self.paused and not self._transport.is_closing()

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def send(self, live: Sequence[Pending], packed: Sequence[bytes]) -> None:
        """Write a batch (never raises: it runs in a loop callback; a lane that cannot
        write is lost, and the batch goes back to the client with the rest)."""
        self._pending.extend(live)
        try:
            self._transport.write(b"".join(packed))
        except Exception as exc:
            self._lose(RedisConnectionError(f"Error while writing to socket: {exc!r}"))
            return
        if self._timeout_s is not None and self._timer is None:
            self._arm()

    # -- asyncio.Protocol ------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        parser.feed(data)
        pending = self._pending
        callbacks = self._callbacks
        while True:
            try:
                reply = parser.gets()
            except Exception as exc:  # a protocol error: nothing after it can be trusted
                self._lose(RedisConnectionError(f"Protocol error from Redis: {exc!r}"))
                return
            if reply is False:
                if not pending and self._drain_waiters:
                    for waiter in self._drain_waiters:
                        if not waiter.done():
                            waiter.set_result(None)
                    self._drain_waiters.clear()
                return
            if not pending:  # a reply to nothing: the stream is out of step
                self._lose(RedisConnectionError("Redis sent a reply no command asked for"))
                return
            if isinstance(reply, RedisConnectionError):
                # LOADING (a restarted Redis reading its data), NOAUTH, too many clients:
                # redis-py retries these with backoff; this command and the rest go back.
                self._lose(reply)
                return
            args, options, future = pending.popleft()
            self._answered += 1
            if future.done():
                continue  # its caller stopped waiting
            if isinstance(reply, Exception):
                if EMPTY_RESPONSE in options:
                    future.set_result(options[EMPTY_RESPONSE])
                else:
                    future.set_exception(reply)
                continue
            callback = callbacks.get(args[0])
            if callback is None:
                future.set_result(reply)
                continue
            try:
                result = callback(reply, **_callback_options(options))
            except Exception as exc:  # as redis-py would raise it to the caller
                future.set_exception(exc)
                continue
            if inspect.isawaitable(result):
                _resolve_later(future, result)
            else:
                future.set_result(result)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False

    def eof_received(self) -> bool | None:
        self._lose(RedisConnectionError("Connection closed by server."))
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._lose(
            RedisConnectionError(f"Connection lost: {exc!r}" if exc else "Connection closed.")
        )

    # -- losing it --------------------------------------------------------------------------

    def _arm(self) -> None:
        assert self._timeout_s is not None
        self._timer = asyncio.get_running_loop().call_later(
            self._timeout_s, self._check, self._answered
        )

    def _check(self, answered: int) -> None:
        """A timeout's worth later: replies owed and none read since, the lane is lost."""
        self._timer = None
        if self.lost or not self._pending:
            return
        if self._answered == answered:
            self._lose(RedisTimeoutError("Timeout reading from Redis"))
            return
        self._arm()

    def _lose(self, why: BaseException) -> None:
        if self.lost:
            return
        self.lost = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        unanswered = [entry for entry in self._pending if not entry[2].done()]
        self._pending.clear()
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)
        with contextlib.suppress(Exception):
            self._transport.abort()
        self._on_lost(self, unanswered, why)

    async def drained(self, timeout_s: float) -> None:
        """Every reply owed has been read (or the lane is lost), within ``timeout_s``."""
        if self.lost or not self._pending:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._drain_waiters.append(waiter)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await waiter

    def close(self) -> None:
        """Closed by its client: what is still unanswered fails (the client is closing)."""
        self.lost = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for _, _, future in self._pending:
            if not future.done():
                future.set_exception(RedisConnectionError("the Redis client closed"))
        self._pending.clear()
        self._transport.close()


def _callback_options(options: dict[str, Any]) -> dict[str, Any]:
    """The options a response callback takes, as ``Redis.parse_response`` passes them."""
    if not options:
        return options
    return {k: v for k, v in options.items() if k not in (NEVER_DECODE, EMPTY_RESPONSE, "keys")}


def _resolve_later(future: asyncio.Future[Any], result: Any) -> None:
    """A response callback that is a coroutine (redis-py awaits those): its value later."""

    async def settle() -> None:
        try:
            value = await result
        except Exception as exc:
            if not future.done():
                future.set_exception(exc)
            return
        if not future.done():
            future.set_result(value)

    task = asyncio.get_running_loop().create_task(settle())
    _SETTLING.add(task)
    task.add_done_callback(_SETTLING.discard)


_SETTLING: set[asyncio.Task[None]] = set()
