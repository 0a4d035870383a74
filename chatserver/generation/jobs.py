"""Reply jobs seen from the generation side: the generation id of a question, and the
upkeep every instance runs: keep itself alive for its jobs, claim the jobs of
instances that died (or of the previous run, in process), and start them.

Every acknowledged question has a job (storage/jobs/); the instance that accepted it runs
it and marks it done once the answer is stored. A job whose holder died is claimed by the
first instance with room once the lease ran out; its reply runs under the same generation
id, so an answer stored before the death is found (``ConversationService.was_answered``)
and never made twice.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import uuid
from typing import TYPE_CHECKING

from protocol import FinishReason, Usage
from protocol.ids import uuid5_str
from storage.jobs.base import ReplyJob, ReplyJobs, oldest_first

from .buffer import ReplyOwner
from .provider import Finish

if TYPE_CHECKING:
    from .manager import GenerationManager

log = logging.getLogger("chatserver.generation")

# Fixed for ever: changing it would give a question answered before the change a second
# generation id, hence a second answer.
_GENERATIONS = uuid.UUID("0b6c8e52-1b53-4c3e-9a57-6f3f0c1e9d21").bytes


@functools.lru_cache(maxsize=1024)  # asked twice a question: by its append's follow, then start
def generation_id_for(question_id: str) -> str:
    """The generation id of the reply to a question: one per question, on every instance."""
    return uuid5_str(_GENERATIONS, question_id)


async def keep_jobs(manager: GenerationManager, jobs: ReplyJobs, lease_s: float) -> None:
    """For the life of the app: alive for one more lease every third of one, claim every
    half lease."""
    loop = asyncio.get_running_loop()
    next_claim = loop.time()
    first = True
    while True:
        if not first:
            await asyncio.sleep(lease_s / 3)
        first = False
        try:
            await jobs.renew()
            if loop.time() >= next_claim:
                next_claim = loop.time() + lease_s / 2
                await claim_jobs(manager, jobs)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # Redis down: next round
            log.warning("reply job upkeep failed: %s", exc)


async def claim_jobs(manager: GenerationManager, jobs: ReplyJobs) -> int:
    """Start the jobs that failed here before an end, then claim dead holders' jobs, within
    this instance's room; how many were started."""
    # Run before and failed: like a claimed job, it looks for an answer stored meanwhile.
    retry = [dataclasses.replace(job, claimed=True) for job in manager.retry_jobs]
    manager.retry_jobs = []
    claimed = await jobs.claim(max(0, manager.room() - len(retry)))
    if claimed:
        manager.metrics.reply_jobs_claimed.inc(len(claimed))
        log.warning(
            "claimed %d reply jobs of a stopped instance",
            len(claimed),
            extra={"questions": [job.message.id for job in claimed]},
        )
    started = 0
    for job in oldest_first([*retry, *claimed]):
        try:
            await resume(manager, job)
            started += 1
        except Exception as exc:
            # Held here now (no other instance claims a live holder's jobs): a store outage
            # looking up one conversation must strand neither it nor the jobs after it.
            log.warning(
                "a claimed reply job could not start, retrying: %r",
                exc,
                extra={"conversation": job.message.conversation_id, "question": job.message.id},
            )
            manager.retry_jobs.append(job)
    return started


async def resume(manager: GenerationManager, job: ReplyJob) -> None:
    """Run a job this instance did not accept: its conversation and agent looked up."""
    message = job.message
    conversation = await manager.conversations.get(message.conversation_id)
    agent_id = conversation.agent_id if conversation is not None else None
    if conversation is None or manager.agents.get(conversation.agent_id) is None:
        # Always an end: the question is stored, so its answer says why there is none.
        owner = ReplyOwner(
            message.conversation_id,
            generation_id_for(message.id),
            manager.server_id,
            agent_id or "",
            "",
            message.id,
        )
        why = f"agent {agent_id!r} is not configured"
        await manager.store_and_end(owner, "", Finish(FinishReason.ERROR, Usage(0, 0), why))
        await jobs_done(manager, job)
        return
    manager.start(conversation, message, job)


async def jobs_done(manager: GenerationManager, job: ReplyJob) -> None:
    if manager.jobs is not None:
        await manager.jobs.done(job)
