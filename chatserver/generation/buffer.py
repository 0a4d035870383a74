"""Resume buffers: the text so far of each running reply, for clients joining mid-stream.

A buffer also records who owns the reply (the instance streaming it). The owner's instance
keeps itself alive (``heartbeat``, one per instance and interval, not per reply); when an
instance dies its replies are claimed by another one, which stores the partial text and
ends them. One reply runs per conversation at a time.

A reply is *watched* when another instance has a member in its conversation: then every
delta is recorded before it is published. An unwatched reply records only checkpoints (with
the heartbeat) until a watcher asks for it (``mark_watched`` records the text so far).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from protocol import GenerationSnapshot
from protocol.record import record
from storage.window.base import AppendFollow, AppendGate

# (conversation_id, generation_id, seq, text): one delta to record.
Delta = tuple[str, str, int, str]


@record
class Record:
    """Text of one reply up to ``seq``, appended unless already recorded up to ``seq``."""

    conversation_id: str
    generation_id: str
    seq: int
    text: str
    mark_watched: bool = False  # from now on every delta is recorded and published
    refresh: bool = False  # a checkpoint: extend the entry's time to live


@record
class Slot:
    """The conversation's reply slot, taken."""

    watched: bool  # another instance has a member in: record and publish every delta


@record
class PreparedReply:
    """A slot taken by the question's own append (``slot_follow``), with the reply's context
    as the window's entries (``HotWindow.context_of`` decodes them)."""

    slot: Slot
    # What the follow read (``HotWindow.context_of``); None: read it as a reply not first in
    # line does.
    context: Sequence[object] | None
    # Taken over from a stopped instance (a sweep runs it again): a reply of the conversation
    # queued here may be waiting for this very slot, so this one does not queue behind it.
    taken_over: bool = False


@record
class RunningReply:
    """What a joining instance needs to know of the reply in progress."""

    snapshot: GenerationSnapshot
    owner: str  # server id
    watched: bool
    # Begun by this process: not by an earlier run under the same server id (that one died).
    mine: bool = False


class LeaseLost(Exception):
    """Another instance took over this reply (our lease expired): stop without finishing."""


@record
class ReplyOwner:
    conversation_id: str
    generation_id: str
    owner: str  # server id
    agent_id: str
    model: str
    reply_to: str

    def ids(self) -> dict[str, str]:
        """For a log line's ``extra``: which reply, whose, answering what."""
        return {
            "conversation": self.conversation_id,
            "generation": self.generation_id,
            "owner": self.owner,
            "question": self.reply_to,
        }


@record
class ClaimedReply:
    owner: ReplyOwner
    seq: int
    text: str
    # A reply its question's append started (the slot is the question's job) of which
    # nothing was recorded: kept, now owned by the claimer, who runs it again (the question
    # at this offset). None: deleted, for the claimer to end with ``text``.
    rerun_offset: int | None = None


class ReplyBuffer(Protocol):
    name: str
    # Whether its calls (and the window's and limiter's beside it) return without a round
    # trip: a caller then awaits them in turn. Gathered, each would be a task, and a task
    # waits a loop pass to start and another to report: ~17 ms of a reply's first token at
    # 300 replies on one embedded instance (bench/results/ttft-hops-2026-12-07.json).
    in_process: bool

    async def begin(self, owner: ReplyOwner) -> Slot | None:
        """Take the conversation's reply slot; None while another live reply holds it."""

    def slot_follow(
        self,
        owner: ReplyOwner,
        later_model: str,
        context: int,
        since: tuple[int, bytes] = (0, b""),
    ) -> AppendFollow | None:
        """A follow of the question's append (its job alone in line) that takes the slot
        for ``owner`` (whose model is the one for a conversation's first question,
        ``later_model`` otherwise) and reads ``context`` messages (those after the offset
        ``since`` names, when read under its epoch: ``HotWindow.context_since``): the reply
        then starts with no round trip. None when this buffer cannot (memory, a cluster, or
        this instance's liveness due for renewal: ``begin`` renews it)."""

    def prepared(self, followed: object) -> PreparedReply | None:
        """What a ``slot_follow`` returned (the append's ``followed``); None: the slot was
        not taken (held, or promised to a waiter): ``begin`` takes it as usual."""

    async def append(self, conversation_id: str, generation_id: str, seq: int, text: str) -> None:
        """Record delta ``seq`` before it is published; ``LeaseLost`` if we were taken over."""

    async def append_many(self, deltas: Sequence[Delta]) -> set[str]:
        """Record a batch of deltas (one loop tick's, of many replies) in one step; the
        generation ids whose lease was lost (their deltas were not recorded)."""

    async def record(self, records: Sequence[Record]) -> set[str]:
        """``append_many`` with checkpoints and switches to watched among them."""

    async def snapshot(self, conversation_id: str) -> GenerationSnapshot | None: ...

    async def running(self, conversation_id: str) -> RunningReply | None:
        """The reply in progress with its owner and whether it is watched."""

    def release_gate(self, conversation_id: str, generation_id: str) -> AppendGate | None:
        """A gate for the reply's own append that releases the entry in the same atomic step
        (so no join or claim sees the reply both running and stored); None when this buffer
        cannot (memory, or a cluster whose window takes no gates): ``end`` releases it."""

    async def end(self, conversation_id: str, generation_id: str, released: bool = False) -> None:
        """Release the entry; ``released``: the append's gate did, only the bookkeeping is
        left."""

    async def start(self) -> None:
        """Before this instance serves: note what an earlier run under the same server id
        left (its replies, swept like a dead instance's)."""

    async def heartbeat(self) -> None:
        """Keep this instance alive (its replies unclaimable) for one more lease."""

    async def owner_of(self, generation_id: str) -> ReplyOwner | None: ...

    async def expired(self) -> list[tuple[str, str]]:
        """Replies whose owner's instance is gone: (conversation, generation)."""

    async def claim(self, conversation_id: str, generation_id: str) -> ClaimedReply | None:
        """Atomically take an expired reply; None if it is live or someone else took it
        (``ClaimedReply.rerun_offset``: kept for the claimer to run again)."""


class _Running:
    __slots__ = ("owner", "parts", "seq")

    def __init__(self, owner: ReplyOwner) -> None:
        self.owner = owner
        self.seq = 0
        self.parts: list[str] = []


class MemoryReplyBuffer:
    """One instance: nobody else can own a reply, so leases never expire."""

    name = "memory"
    in_process = True

    def __init__(self) -> None:
        self._running: dict[str, _Running] = {}
        self._by_generation: dict[str, ReplyOwner] = {}

    async def begin(self, owner: ReplyOwner) -> Slot | None:
        current = self._running.get(owner.conversation_id)
        if current is not None and current.owner.generation_id != owner.generation_id:
            return None
        self._running[owner.conversation_id] = _Running(owner)
        self._by_generation[owner.generation_id] = owner
        # "Watched": no other instance exists, but recording here is a list append, and it
        # keeps the one-instance path exactly as it was (every delta through the broker).
        return Slot(watched=True)

    def slot_follow(
        self,
        owner: ReplyOwner,
        later_model: str,
        context: int,
        since: tuple[int, bytes] = (0, b""),
    ) -> AppendFollow | None:
        return None  # taking the slot costs no round trip here

    def prepared(self, followed: object) -> PreparedReply | None:
        return None

    async def append(self, conversation_id: str, generation_id: str, seq: int, text: str) -> None:
        running = self._running.get(conversation_id)
        if running is None or running.owner.generation_id != generation_id:
            raise LeaseLost(generation_id)
        running.seq = seq
        running.parts.append(text)

    async def append_many(self, deltas: Sequence[Delta]) -> set[str]:
        lost: set[str] = set()
        running_by = self._running
        for conversation_id, generation_id, seq, text in deltas:
            running = running_by.get(conversation_id)
            if running is None or running.owner.generation_id != generation_id:
                lost.add(generation_id)
                continue
            if seq > running.seq:  # sent again: not twice
                running.seq = seq
                running.parts.append(text)
        return lost

    async def record(self, records: Sequence[Record]) -> set[str]:
        return await self.append_many(
            [(r.conversation_id, r.generation_id, r.seq, r.text) for r in records]
        )

    async def snapshot(self, conversation_id: str) -> GenerationSnapshot | None:
        running = self._running.get(conversation_id)
        if running is None:
            return None
        return GenerationSnapshot(running.owner.generation_id, running.seq, "".join(running.parts))

    async def running(self, conversation_id: str) -> RunningReply | None:
        snapshot = await self.snapshot(conversation_id)
        if snapshot is None:
            return None
        return RunningReply(snapshot, self._running[conversation_id].owner.owner, True, True)

    def release_gate(self, conversation_id: str, generation_id: str) -> AppendGate | None:
        return None  # in process: end() releases it, nobody can look in between

    async def end(self, conversation_id: str, generation_id: str, released: bool = False) -> None:
        running = self._running.get(conversation_id)
        if running is not None and running.owner.generation_id == generation_id:
            del self._running[conversation_id]
        self._by_generation.pop(generation_id, None)

    async def start(self) -> None:
        pass  # nothing outlives the process

    async def heartbeat(self) -> None:
        return None

    async def owner_of(self, generation_id: str) -> ReplyOwner | None:
        return self._by_generation.get(generation_id)

    async def expired(self) -> list[tuple[str, str]]:
        return []

    async def claim(self, conversation_id: str, generation_id: str) -> ClaimedReply | None:
        return None
