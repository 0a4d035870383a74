"""Where a run's chunks come from: a pushing provider, a pulled one, or a cached answer.

Whichever it is, the chunks go into the run (its ``ChunkSink``) and the run's handle stops
the source at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from protocol import FinishReason, Usage

from .provider import (
    Chunk,
    Finish,
    Provider,
    PushProvider,
    ReplyRequest,
    StreamItem,
    is_retryable,
)
from .streaming import BACKLOG_LIMIT, ReplyRun

log = logging.getLogger("chatserver.generation")

_REPLAY_WORDS = 4  # words per chunk when a cached answer is streamed


def start_stream(
    provider: Provider, push: PushProvider | None, request: ReplyRequest, run: ReplyRun
) -> None:
    """Start the provider's stream into ``run`` (its handle set, so ``stop`` reaches it)."""
    if push is not None:
        run.handle = push.open(request, run)
    else:
        start_stream_from(provider.stream(request), run)


def start_stream_from(items: AsyncIterator[StreamItem], run: ReplyRun) -> None:
    """Read a pull provider's stream ``items`` (begun already, or not) into ``run``."""
    run.handle = _TaskStream(asyncio.create_task(_produce(items, run)))


def replay(text: str, run: ReplyRun) -> None:
    """Stream a cached answer like a model would: chunks, then ``stop``, no tokens."""
    run.handle = _Replayed()
    words = text.split(" ")
    for start in range(0, len(words), _REPLAY_WORDS):
        piece = " ".join(words[start : start + _REPLAY_WORDS])
        last = start + _REPLAY_WORDS >= len(words)
        run.chunk(piece if last else piece + " ")
    run.finish(Finish(FinishReason.STOP, Usage(0, 0)))


class _TaskStream:
    """A pull provider's stream: the producer task; cancelling it closes the upstream."""

    __slots__ = ("task",)

    def __init__(self, task: asyncio.Task[None]) -> None:
        self.task = task

    def cancel(self) -> None:
        self.task.cancel()


class _Replayed:
    """A cached answer, pushed whole at once: nothing left to stop."""

    __slots__ = ()

    def cancel(self) -> None:
        return None


async def _produce(items: AsyncIterator[StreamItem], run: ReplyRun) -> None:
    """Iterate a pull provider's stream into the run; waits when the pump falls behind."""
    finish: Finish | None = None
    try:
        async for item in items:
            if isinstance(item, Finish):
                finish = item
                break
            if isinstance(item, Chunk):
                run.chunk(item.text)
                if run.backlog() >= BACKLOG_LIMIT:
                    run.waiter = asyncio.get_running_loop().create_future()
                    await run.waiter
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        log.warning("provider failed: %s", exc)
        finish = Finish(
            FinishReason.ERROR,
            Usage(0, 0),
            f"model error: {exc}",
            retryable=not run.parts and run.pending is None and is_retryable(exc),
        )
    finally:
        # Also when cancelled: the canceller ended the run already (a no-op then).
        run.pump.end(run, finish)
