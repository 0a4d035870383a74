"""Lease upkeep: keep this instance alive, checkpoint its unwatched replies, and end the
replies of instances that died.

Per instance and interval, not per reply: one heartbeat every third of a lease, and the
unwatched replies' text recorded with it (a claimer keeps the text to the last checkpoint).
Runs for the life of the app on every instance; with the memory buffer there is never
anything to renew or sweep.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from protocol import FinishReason, Usage

from .buffer import ClaimedReply, ReplyBuffer, ReplyOwner
from .provider import Finish

log = logging.getLogger("chatserver.generation")

Checkpoint = Callable[[], None]  # hand the unwatched replies' text to the pump
StoreAndEnd = Callable[[ReplyOwner, str, Finish], Awaitable[None]]
Rerun = Callable[[ClaimedReply], Awaitable[None]]  # run a claimed reply again, here


async def keep_leases(
    buffer: ReplyBuffer,
    checkpoint: Checkpoint,
    store_and_end: StoreAndEnd,
    lease_s: float,
    sweep_s: float,
    rerun_unstarted: bool = False,
    rerun: Rerun | None = None,
) -> None:
    """``rerun_unstarted``: every question has a shared reply job or a slot that stands for
    it; ``rerun`` runs the latter again (``end_orphan``)."""
    renew_every = lease_s / 3
    loop = asyncio.get_running_loop()
    next_sweep = loop.time() + sweep_s
    first = True
    while True:
        if not first:
            await asyncio.sleep(min(renew_every, sweep_s))
        first = False
        try:
            checkpoint()
            await buffer.heartbeat()
            if loop.time() >= next_sweep:
                next_sweep = loop.time() + sweep_s
                await sweep_orphans(buffer, store_and_end, rerun_unstarted, rerun)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # Redis down: try again next round
            log.warning("lease upkeep failed: %s", exc)


async def sweep_orphans(
    buffer: ReplyBuffer,
    store_and_end: StoreAndEnd,
    rerun_unstarted: bool = False,
    rerun: Rerun | None = None,
) -> None:
    """Claim and end every reply whose lease ran out, keeping its partial text."""
    for conversation_id, generation_id in await buffer.expired():
        await end_orphan(
            buffer, store_and_end, conversation_id, generation_id, rerun_unstarted, rerun
        )


async def end_orphan(
    buffer: ReplyBuffer,
    store_and_end: StoreAndEnd,
    conversation_id: str,
    generation_id: str,
    rerun_unstarted: bool = False,
    rerun: Rerun | None = None,
) -> bool:
    """End a reply cut off by its owner's death with its partial text, if we win its claim.

    Its reply job is not run again: the partial text was shown, and a second attempt would
    be a second visible answer to one question (docs/architecture.md, reply jobs). Except,
    with ``rerun_unstarted`` (its job is shared: claimed and run by a live instance), a
    reply of which nothing was recorded: its slot is freed and no answer stored, so that
    its job runs it afresh rather than answer with nothing. One whose slot stood for its
    question's job (``ClaimedReply.rerun_offset``: the claim kept it for us) is run again
    here (``rerun``)."""
    claimed = await buffer.claim(conversation_id, generation_id)
    if claimed is None:
        return False
    if claimed.rerun_offset is not None and rerun is not None:
        await rerun(claimed)
        return True
    if rerun_unstarted and claimed.seq == 0 and not claimed.text:
        log.warning(
            "freed the slot of a reply whose instance died before recording any of it: "
            "its job runs it again",
            extra=claimed.owner.ids(),
        )
        return True
    log.warning(
        "ending a reply whose instance died",
        extra=claimed.owner.ids(),
    )
    finish = Finish(
        FinishReason.ERROR,
        Usage(0, 0),
        "the instance streaming this reply stopped; the partial text is kept",
    )
    await store_and_end(claimed.owner, claimed.text, finish)
    return True
