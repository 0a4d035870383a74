"""Script calls of the resume buffers in as few round trips as the client allows: one
pipeline on one Redis (scripts by EVALSHA, reloaded once if Redis lost them), the tick's own
batch on the per-tick client, one call per slot group on a cluster (a bounded number in
flight)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError

from ..redis_ticks import TickPipelinedRedis

_CLUSTER_FANOUT = 64  # calls in flight at once when a batch spans a cluster's slots

Call = tuple[Any, list[str], list[Any]]  # (registered script, keys, args)


async def script_calls(
    redis: Redis | RedisCluster, calls: Sequence[Call], extra: Sequence[tuple[Any, ...]] = ()
) -> list[Any]:
    """Script calls (and plain commands ``extra``, sent first) in one round trip on one
    Redis; the scripts' results, in order."""
    if isinstance(redis, TickPipelinedRedis):  # first: the production client, the cheap check
        return await _ticked_calls(redis, calls, extra)
    if isinstance(redis, RedisCluster):
        for command in extra:
            await redis.execute_command(*command)
        return await _cluster_calls(calls)
    out: list[Any] = [None] * len(calls)
    todo = list(range(len(calls)))
    first = True
    while True:
        pipe = redis.pipeline(transaction=False)
        if first:
            for command in extra:
                pipe.execute_command(*command)
        for index in todo:
            scr, keys, args = calls[index]
            # EVALSHA straight, not through the Script: a pipeline holding a Script
            # asks SCRIPT EXISTS first, a second round trip on every batch.
            pipe.evalsha(scr.sha, len(keys), *keys, *args)
        done: list[Any] = await pipe.execute(raise_on_error=False)
        done = done[len(extra) :] if first else done
        if len(done) != len(todo):
            # Seen with Redis going away mid-pipeline: fewer answers than calls. Nothing
            # can be said of the calls without one: a connection failure, like any other.
            raise RedisConnectionError(f"a pipeline of {len(todo)} calls got {len(done)}")
        missing = []
        for index, result in zip(todo, done, strict=True):
            if isinstance(result, NoScriptError) and first:
                missing.append(index)  # Redis restarted or flushed its scripts
            elif isinstance(result, Exception):
                raise result
            else:
                out[index] = result
        if not missing:
            return out
        for scr in {calls[i][0] for i in missing}:
            scr.sha = await redis.script_load(scr.script)
        todo, first = missing, False  # only those: the others ran already


async def _cluster_calls(calls: Sequence[Call]) -> list[Any]:
    """One conversation's calls one after another, in their order (each may go on another
    connection: sent at once, a delta's record could overtake the resync before it, which
    then finds its ``seq`` passed and is dropped, losing the text's head); the
    conversations' chains alongside, a bounded number at once."""
    results: list[Any] = [None] * len(calls)
    chains: dict[str, list[int]] = {}
    for index, (_, keys, _) in enumerate(calls):
        chains.setdefault(keys[0] if keys else "", []).append(index)

    async def chain(indices: list[int]) -> None:
        for index in indices:
            scr, keys, args = calls[index]
            results[index] = await scr(keys=keys, args=args)

    pending = list(chains.values())
    for start in range(0, len(pending), _CLUSTER_FANOUT):
        await asyncio.gather(*(chain(c) for c in pending[start : start + _CLUSTER_FANOUT]))
    return results


async def _ticked_calls(
    redis: TickPipelinedRedis, calls: Sequence[Call], extra: Sequence[tuple[Any, ...]]
) -> list[Any]:
    """``_calls`` on a client that pipelines per loop tick: each call on its own, so that
    they share the tick's pipeline with everything else sent meanwhile (issued as
    futures: no task per call)."""
    answers = await asyncio.gather(
        *(redis.issue(*command) for command in extra),
        *(redis.issue("EVALSHA", s.sha, len(keys), *keys, *args) for s, keys, args in calls),
        return_exceptions=True,
    )
    for answer in answers[: len(extra)]:
        if isinstance(answer, BaseException):
            raise answer
    out = list(answers[len(extra) :])
    missing = [i for i, answer in enumerate(out) if isinstance(answer, NoScriptError)]
    for scr in {calls[i][0] for i in missing}:  # Redis restarted or flushed its scripts
        scr.sha = await redis.script_load(scr.script)
    if missing:
        again = await asyncio.gather(
            *(calls[i][0](keys=calls[i][1], args=calls[i][2]) for i in missing),
            return_exceptions=True,
        )
        for index, answer in zip(missing, again, strict=True):
            out[index] = answer
    for answer in out:
        if isinstance(answer, BaseException):
            raise answer
    return out
