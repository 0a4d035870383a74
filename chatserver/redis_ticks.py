"""A Redis client that sends every command of one event-loop tick in one pipeline.

Replies, sends and background upkeep each issue a few Redis commands; under load, dozens of
them are issued in the same tick of the loop, from different tasks. Sent one by one, each
costs a pooled connection, a write, a read and a wake-up. Gathered per tick, they cost one
of each for all of them, and Redis reads them in one event (see ``chatload.redisstat``'s
``round_trips``). Nothing is delayed: the batch goes out at the end of the tick it was
started in, before the loop waits for I/O again.

Where it can (a plain TCP or Unix socket, replies as bytes, RESP2), every batch rides the lane
(``redis_lane.py``): one connection whose replies are read as they arrive, in the callback
that brings them. The kept connections below carry the batches while there is no lane (at
start-up, a second after one was lost, its socket's buffer full) and where there cannot be one
(TLS, decoded replies, RESP3).

A batch is written and read on a connection this client keeps between batches (a few; more
batches in flight take pooled ones): every reply on it was read, so it skips the pool's lock
and its check for unread data, a read that costs the batch another pass of the loop. On a
kept connection the batch is written in the callback that closes it, not by the task that
reads its replies: a task's first step runs a pass later, and under load a pass of the loop
is milliseconds that every round trip on the way to a first token would wait.

Semantics stay those of single commands: each caller gets its own reply or its own error
(a script's ``NOSCRIPT`` included, so ``Script`` reloads as before); a connection error
fails the commands of that batch, after the client's retries (the whole batch again, on a
new connection, as a pipeline does), like it would fail each. A
caller that stops waiting (a timeout) only drops its reply; the others are unaffected.
Commands that block on the server (``BLOCK``, ``B*POP*``, ``BLMOVE``, ``WAIT``) keep their
own connection.

Commands are packed by hiredis (:func:`pack_commands`): redis-py's asyncio client packs in
Python, about ten times the cost, which was 4% of a production instance's CPU under load.
A batch's replies are read under one timeout (the connection's socket timeout), not one each.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from typing import Any

import hiredis
from redis.asyncio import Redis
from redis.asyncio.connection import Connection, UnixDomainSocketConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .redis_lane import ReplyLane
from .redis_scripts import TickScript

log = logging.getLogger(__name__)

_Pending = tuple[tuple[Any, ...], dict[str, Any], "asyncio.Future[Any]"]
_IDLE_KEPT = 4  # connections kept between batches; more in flight go back to the pool
LANE_RETRY_S = 1.0  # a lane lost or refused: batches take pooled connections this long


def pack_commands(conn: Any, commands: Iterable[tuple[Any, ...]]) -> list[bytes]:
    """RESP of ``commands`` as ``conn.pack_commands`` gives it, packed by hiredis. A command
    whose name holds a space (``SCRIPT LOAD``: redis-py splits it) or an argument hiredis
    does not take (redis-py refuses those too, with its own error) goes redis-py's way."""
    out: list[bytes] = []
    for args in commands:
        name = args[0]
        if not (isinstance(name, str) and " " in name) and not (
            isinstance(name, bytes) and b" " in name
        ):
            try:
                out.append(hiredis.pack_command(args))
                continue
            except TypeError:
                pass
        out.extend(conn.pack_command(*args))
    return out


def _blocks(args: tuple[Any, ...]) -> bool:
    """A command the server may hold: it must not hold a whole batch with it."""
    name = args[0]
    if name in _NEVER_BLOCK:  # nearly every command: asked once per command issued
        return False
    upper = (name.decode() if isinstance(name, bytes) else str(name)).upper()
    # BLPOP, BRPOP, BZPOPMIN/MAX, BLMPOP, BZMPOP, BLMOVE, BRPOPLPUSH; WAIT, WAITAOF.
    if (upper.startswith("B") and ("POP" in upper or upper == "BLMOVE")) or upper.startswith(
        "WAIT"
    ):
        return True
    if upper in {"XREAD", "XREADGROUP"}:
        return any(isinstance(a, (str, bytes)) and a in ("BLOCK", b"BLOCK") for a in args)
    if len(_NEVER_BLOCK) < 512:  # the names a client issues: a few dozen
        _NEVER_BLOCK.add(name)
    return False


_NEVER_BLOCK: set[Any] = set()  # command names (as issued) that never block


class TickPipelinedRedis(Redis):
    """``redis.asyncio.Redis`` whose commands are gathered per loop tick (module docstring).

    Explicit pipelines (``pipeline()``) and Pub/Sub are untouched: they have their own
    connection and their own round trip, as before."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._batch: list[_Pending] | None = None
        self._sending: set[asyncio.Task[None]] = set()
        # Connections this client keeps between batches: all their replies were read, so
        # they skip the pool's lock and its check for unread data (a read that yields).
        self._idle: list[Any] = []
        self.scripts: list[Any] = []  # every Script registered: loaded at start-up at once
        self.batches = 0  # pipelines sent (for tests and the batch-size gauge)
        self.batched = 0  # commands sent in them
        # The lane (redis_lane.py): where hiredis can read what the connection brings.
        kwargs = self.connection_pool.connection_kwargs
        self.lean_replies = (
            self.connection_pool.connection_class in (Connection, UnixDomainSocketConnection)
            and not kwargs.get("decode_responses")
            and kwargs.get("protocol") in (None, 2, "2")
        )
        self._lane: ReplyLane | None = None
        self._lane_opening: asyncio.Task[None] | None = None
        self._lane_retry_at = 0.0
        self._closing = False
        self.lanes_opened = 0  # for tests

    def register_script(self, script: Any) -> Any:
        registered = TickScript(self, script)
        self.scripts.append(registered)
        return registered

    async def preload_scripts(self) -> int:
        """``SCRIPT LOAD`` every script registered so far, in one batch: their first calls
        then find them, instead of each failing ``NOSCRIPT`` and loading on its own (a
        round trip and an error each, over a hundred at an instance's start). How many."""
        scripts = {s.sha: s.script for s in self.scripts}
        await asyncio.gather(*(self.issue("SCRIPT", "LOAD", text) for text in scripts.values()))
        for script in self.scripts:
            script.loaded = True
        return len(scripts)

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        if self.connection is not None or _blocks(args):
            return await super().execute_command(*args, **options)  # type: ignore[no-untyped-call]
        return await self.issue(*args, **options)

    def issue(self, *args: Any, **options: Any) -> asyncio.Future[Any]:
        """The command joins this tick's batch now; the future gets its reply or its error.

        ``execute_command`` without the coroutine: many commands issued at once and gathered
        as futures cost no task each (a task's first step also runs a pass later). For
        commands ``execute_command`` would send alone (module docstring) it is a task."""
        loop = asyncio.get_running_loop()
        if self.connection is not None or _blocks(args):
            return loop.create_task(self.execute_command(*args, **options))
        future: asyncio.Future[Any] = loop.create_future()
        if self._batch is None:
            self._batch = []
            loop.call_soon(self._flush)
        self._batch.append((args, options, future))
        return future

    def _flush(self) -> None:
        batch, self._batch = self._batch or [], None
        live = [entry for entry in batch if not entry[2].done()]
        if not live:
            return
        self.batches += 1
        self.batched += len(live)
        lane = self._lane
        if lane is not None and lane.usable:
            try:
                packed = pack_commands(lane.conn, [args for args, _, _ in live])
            except Exception:  # a command that does not pack: the usual way reports it
                pass
            else:
                lane.send(live, packed)
                return
        elif lane is None or lane.lost:
            self._open_lane_soon()
        kept, written = self._write_now(live)
        task = asyncio.get_running_loop().create_task(self._send(live, kept, written))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def open_lane(self) -> bool:
        """Open the lane now (at start-up: the first requests ride it); whether one is open."""
        if self._lane is None or self._lane.lost:
            self._open_lane_soon()
            opening = self._lane_opening
            if opening is not None:
                await asyncio.shield(opening)
        return self._lane is not None and not self._lane.lost

    def _open_lane_soon(self) -> None:
        if not self.lean_replies or self._lane_opening is not None or self._closing:
            return
        loop = asyncio.get_running_loop()
        if loop.time() < self._lane_retry_at:
            return
        self._lane_opening = loop.create_task(self._open_lane(), name="redis-lane")

    async def _open_lane(self) -> None:
        """A pooled connection, connected and handshaken by redis-py, becomes the lane."""
        loop = asyncio.get_running_loop()
        try:
            conn = await self.connection_pool.get_connection()  # type: ignore[no-untyped-call]
            try:
                if self._closing or conn._writer is None or conn._writer.transport.is_closing():
                    raise RedisConnectionError("the connection closed before it became a lane")
                self._lane = ReplyLane(
                    conn, self.response_callbacks, self._lane_lost, conn.socket_timeout
                )
            except BaseException:
                await self.connection_pool.release(conn)
                raise
            self.lanes_opened += 1
        except Exception as exc:  # batches keep the pooled connections meanwhile
            log.debug("no Redis lane yet: %r", exc)
            self._lane_retry_at = loop.time() + LANE_RETRY_S
        finally:
            self._lane_opening = None

    def _lane_lost(self, lane: ReplyLane, unanswered: list[_Pending], why: BaseException) -> None:
        """The lane's unanswered commands go out again, with the client's retries; its
        connection goes back to the pool closed (it reconnects when next taken)."""
        if self._lane is lane:
            self._lane = None
        loop = asyncio.get_running_loop()
        self._lane_retry_at = loop.time() + LANE_RETRY_S  # not again at once: Redis may be down
        tasks = [loop.create_task(self._retire(lane.conn))]
        if unanswered:
            log.debug("Redis lane lost with %d commands unanswered: %r", len(unanswered), why)
            if lane.conn.retry.get_retries() > 0:  # the loss was the first try's failure
                tasks.append(loop.create_task(self._send(unanswered, None, False)))
            else:
                for _, _, future in unanswered:
                    _fail(future, why)
        for task in tasks:
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _retire(self, conn: Any) -> None:
        with contextlib.suppress(Exception):
            await conn.disconnect(nowait=True)
        await self.connection_pool.release(conn)

    def _write_now(self, live: list[_Pending]) -> tuple[Any | None, bool]:
        """The batch written at once on a kept connection (module docstring): the kept
        connection taken (None: none is kept) and whether the batch went out on it. Never
        raises: it runs in a loop callback, where an error would leave the batch unanswered.
        """
        if not self._idle:
            return None, False
        conn = self._idle.pop()
        writer = getattr(conn, "_writer", None)  # what send_packed_command writes to
        if writer is None or writer.transport.is_closing():
            return conn, False  # lost while kept: its task connects it again
        try:
            packed = pack_commands(conn, [args for args, _, _ in live])
            writer.writelines(packed)
        except Exception:  # uvloop refuses a write on a transport it just closed (or a
            return conn, False  # command does not pack): the task tries, and reports, anew
        return conn, True

    async def _send(self, live: list[_Pending], kept: Any | None, written: bool) -> None:
        try:
            pool = self.connection_pool
            conn = kept or await pool.get_connection()  # type: ignore[no-untyped-call]
            if kept is not None and not written:
                await kept.disconnect(nowait=True)  # lost: the exchange connects it again
        except BaseException as exc:
            for _, _, future in live:
                _fail(future, exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        sent = written  # the first try's write is done; a retry writes again
        try:

            async def exchange() -> list[Any]:
                nonlocal sent
                first, sent = sent, False
                return await self._exchange(conn, live, written=first)

            # A connection error retries the whole batch on a new connection, as a
            # pipeline would (the window's append knows its own script run twice).
            results = await conn.retry.call_with_retry(exchange, lambda _error: conn.disconnect())
        except BaseException as exc:
            # Replies may be left unread on it: never reuse it.
            with contextlib.suppress(Exception):
                await conn.disconnect()
            await self.connection_pool.release(conn)
            for _, _, future in live:
                _fail(future, exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        for (_, _, future), result in zip(live, results, strict=True):
            if future.done():
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)
        if len(self._idle) < _IDLE_KEPT:
            self._idle.append(conn)
        else:
            await self.connection_pool.release(conn)

    async def _exchange(self, conn: Any, live: list[_Pending], written: bool) -> list[Any]:
        """The batch written at once (unless ``written``), then its replies read in order,
        each through the client's own parsing (callbacks, NEVER_DECODE); a server error is
        its command's."""
        if written:
            # Flow control, and errors reported as send_packed_command would (a retry's).
            try:
                async with asyncio.timeout(conn.socket_timeout):
                    await conn._writer.drain()
            except TimeoutError:
                await conn.disconnect(nowait=True)
                raise RedisTimeoutError("Timeout writing to socket") from None
            except OSError as exc:
                await conn.disconnect(nowait=True)
                raise RedisConnectionError(f"Error while writing to socket: {exc}") from exc
        else:
            await conn.send_packed_command(
                pack_commands(conn, [args for args, _, _ in live]), check_health=False
            )
        # One timer for the batch's replies, not one per reply (redis-py arms its socket
        # timeout around every read: 2% of a production instance's CPU under load).
        limit = conn.socket_timeout
        results: list[Any] = []
        try:
            async with asyncio.timeout(limit):
                conn.socket_timeout = None
                try:
                    for args, options, _ in live:
                        try:
                            results.append(await self.parse_response(conn, args[0], **options))
                        except ResponseError as exc:
                            results.append(exc)
                finally:
                    conn.socket_timeout = limit
        except TimeoutError:  # as redis-py reports its own: the client's retry takes it
            await conn.disconnect(nowait=True)
            raise RedisTimeoutError("Timeout reading from Redis") from None
        return results

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        self._closing = True
        if self._lane_opening is not None:
            await asyncio.wait({self._lane_opening}, timeout=5)
        lane, self._lane = self._lane, None
        if lane is not None:  # replies in flight reach their callers before it closes
            await lane.drained(5.0)
            if not lane.lost:  # else _lane_lost retired its connection
                lane.close()
                await self._retire(lane.conn)
        if self._sending:  # replies in flight reach their callers before the pool closes
            await asyncio.wait(set(self._sending), timeout=5)
        idle, self._idle = self._idle, []
        for conn in idle:
            await self.connection_pool.release(conn)
        await super().aclose(close_connection_pool)


def _fail(future: asyncio.Future[Any], exc: BaseException) -> None:
    if future.done():
        return
    if isinstance(exc, asyncio.CancelledError):
        future.cancel()
    else:
        future.set_exception(exc)
