"""Lua scripts of the tick-pipelined client: each call joins the tick's batch, and a script
Redis lacks is loaded once for all its callers."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

if TYPE_CHECKING:
    from .redis_ticks import TickPipelinedRedis


class TickScript(AsyncScript):
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
