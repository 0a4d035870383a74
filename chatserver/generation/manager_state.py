"""What the parts of ``GenerationManager`` share: its state, declared once for type checking
(``GenerationManager.__init__`` sets it), the constants, and the steps one part calls in
another (each defined where it belongs).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from protocol.backoff import Backoff

if TYPE_CHECKING:
    from protocol import Message
    from storage.jobs.base import ReplyJob, ReplyJobs
    from storage.records import Conversation

    from ..agents import AgentCatalog
    from ..conversations import ConversationService
    from ..fanout.envelope import Control
    from ..ops.metrics import Metrics
    from .buffer import PreparedReply, ReplyBuffer, ReplyOwner
    from .cache import ResponseCache
    from .provider import Finish, Provider, PushProvider
    from .routing import Router
    from .streaming import DeliverEvents, DeltaPump, Publish, ReplyRun
    from .turn_queue import TurnQueue

log = logging.getLogger("chatserver.generation")

SendControl = Callable[[str, "Control"], Awaitable[None]]
Announce = Callable[[str, "Control"], Awaitable[None]]
OnUsage = Callable[[str, int], Awaitable[None]]  # (user billed, tokens)
RETRY_FOR_S = 30.0  # how long a finishing reply waits out a Redis or store outage
# How long a join waits for the owner of an unwatched reply to record its text; past it
# (the owner died) the join takes what Redis holds, the last checkpoint.
WATCH_ACK_TIMEOUT_S = 2.0
T = TypeVar("T")
# Asking again for a reply slot or a job's turn that another reply holds (it ends soon).
SLOT_POLL = Backoff(0.02, 0.5)
# A question held back by one held here, or behind an older one waiting here: woken by its end;
# this only bounds the wait should that wake-up never come (the older one failed, to retry).
LOCAL_TURN_WAIT_S = 1.0
# Riding out Redis or the store restarting while a reply finishes.
OUTAGE_RETRY = Backoff(0.05, 2.0)


def reply_ids(run: ReplyRun) -> dict[str, str]:
    """For a log line's ``extra``: which reply, answering what."""
    return {
        "conversation": run.conversation_id,
        "generation": run.generation_id,
        "question": run.reply_to.id,
    }


class Lane:
    """One conversation's replies on this instance: one runs, the others wait their turn."""

    __slots__ = ("lock", "waiting")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.waiting = 0


class ManagerState:
    conversations: ConversationService
    _conversations: ConversationService
    _publish: Publish
    _buffer: ReplyBuffer
    provider: Provider
    agents: AgentCatalog
    _agents: AgentCatalog
    metrics: Metrics
    _metrics: Metrics
    server_id: str
    _server_id: str
    _send_control: SendControl | None
    _router: Router
    _cache: ResponseCache | None
    _on_usage: OnUsage | None
    _max_queued: int
    _context: int
    _slot_wait_s: float
    jobs: ReplyJobs | None
    _max_held: int
    _attempts: int
    _backoff: Backoff
    held: dict[str, ReplyJob]
    retry_jobs: list[ReplyJob]
    _runs: dict[str, ReplyRun]
    _live: dict[str, ReplyRun]
    _live_in: dict[str, ReplyRun]
    _acks: dict[str, list[asyncio.Future[None]]]
    _deliver_events: DeliverEvents | None
    _announce: Announce | None
    _lanes: dict[str, Lane]
    _pending: int
    _waiting_turn: dict[str, TurnQueue]
    _tasks: set[asyncio.Task[None]]
    _closing: bool
    _push: PushProvider | None
    _pump: DeltaPump
    _early_calls: bool
    _early_open: int
    _no_early: dict[str, float]

    # Steps one part takes in another (defined there; these only name them for the checker).
    async def _retrying(self, what: str, call: Callable[..., Awaitable[T]], *args: Any) -> T:
        raise NotImplementedError

    async def store_and_end(self, owner: ReplyOwner, text: str, finish: Finish) -> None:
        raise NotImplementedError

    def start(
        self,
        conversation: Conversation,
        message: Message,
        job: ReplyJob | None = None,
        followed: object = None,
        *,
        prepared: PreparedReply | None = None,
    ) -> None:
        raise NotImplementedError

    async def _stream(self, run: ReplyRun) -> None:
        raise NotImplementedError

    async def _job_for(self, run: ReplyRun) -> ReplyJob | None:
        raise NotImplementedError

    def _slot_free_here(self, conversation_id: str) -> bool:
        raise NotImplementedError
