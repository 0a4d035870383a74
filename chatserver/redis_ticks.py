"""A Redis client that sends every command of one event-loop tick in one pipeline.

Replies, sends and background upkeep each issue a few Redis commands; under load, dozens of
them are issued in the same tick of the loop, from different tasks. Sent one by one, each
costs a pooled connection, a write, a read and a wake-up. Gathered per tick, they cost one
of each for all of them, and Redis reads them in one event (see ``chatload.redisstat``'s
``round_trips``). Nothing is delayed: the batch goes out at the end of the tick it was
started in, before the loop waits for I/O again.

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
from collections.abc import Iterable, Sequence
from typing import Any

import hiredis
from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

_Pending = tuple[tuple[Any, ...], dict[str, Any], "asyncio.Future[Any]"]
_IDLE_KEPT = 4  # connections kept between batches; more in flight go back to the pool


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
    if isinstance(name, bytes):
        name = name.decode()
    name = str(name).upper()
    # BLPOP, BRPOP, BZPOPMIN/MAX, BLMPOP, BZMPOP, BLMOVE, BRPOPLPUSH; WAIT, WAITAOF.
    if (name.startswith("B") and ("POP" in name or name == "BLMOVE")) or name.startswith("WAIT"):
        return True
    if name in {"XREAD", "XREADGROUP"}:
        return any(isinstance(a, (str, bytes)) and a in ("BLOCK", b"BLOCK") for a in args)
    return False


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

    def register_script(self, script: Any) -> Any:
        registered = _TickScript(self, script)
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
        kept, written = self._write_now(live)
        task = asyncio.get_running_loop().create_task(self._send(live, kept, written))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

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
        if self._sending:  # replies in flight reach their callers before the pool closes
            await asyncio.wait(set(self._sending), timeout=5)
        idle, self._idle = self._idle, []
        for conn in idle:
            await self.connection_pool.release(conn)
        await super().aclose(close_connection_pool)


class _TickScript(AsyncScript):
    """A registered script whose call joins the tick's batch at once. redis-py's goes
    through three coroutines and an import statement per call: 2% of a busy instance.

    A script Redis may not hold yet (registered after start-up, or Redis lost its scripts:
    a restart) is loaded once for all its callers: the first call's ``SCRIPT LOAD`` goes in
    the same batch just before its ``EVALSHA`` (one round trip, no ``NOSCRIPT``), and calls
    meanwhile wait for that load. redis-py's loads once per caller that failed: a burst of
    replies after a restart sent hundreds of loads, each an error and two round trips more.
    """

    def __init__(self, registered_client: Any, script: Any) -> None:
        super().__init__(registered_client, script)
        self.loaded = False  # known to be in Redis (until a NOSCRIPT says otherwise)
        self._loading: asyncio.Future[Any] | None = None

    async def __call__(
        self,
        keys: Sequence[Any] | None = None,
        args: Iterable[Any] | None = None,
        client: Any = None,
    ) -> Any:
        redis: TickPipelinedRedis = self.registered_client  # type: ignore[assignment]
        if client is not None and client is not redis:
            return await super().__call__(keys, args, client)
        keys, args = keys or (), tuple(args or ())
        if not self.loaded:
            await self._load(redis)
        try:
            return await redis.issue("EVALSHA", self.sha, len(keys), *keys, *args)
        except NoScriptError:  # Redis lost its scripts (a restart), or the load failed
            self.loaded = False
            await self._load(redis, wait=True)  # its error, should it fail, is the caller's
            return await redis.issue("EVALSHA", self.sha, len(keys), *keys, *args)

    async def _load(self, redis: TickPipelinedRedis, *, wait: bool = False) -> None:
        """The shared load: started by this call (``wait``: else its EVALSHA follows in the
        same batch), or awaited when another call started it."""
        loading = self._loading
        if loading is None:
            loading = self._loading = redis.issue("SCRIPT", "LOAD", self.script)
            loading.add_done_callback(self._load_done)
            if not wait:
                return
        await asyncio.shield(loading)  # a caller cancelled leaves the load to the others

    def _load_done(self, loading: asyncio.Future[Any]) -> None:
        if self._loading is loading:
            self._loading = None
        if not loading.cancelled() and loading.exception() is None:
            self.loaded = True


def _fail(future: asyncio.Future[Any], exc: BaseException) -> None:
    if future.done():
        return
    if isinstance(exc, asyncio.CancelledError):
        future.cancel()
    else:
        future.set_exception(exc)
