"""This instance's side of presence: counts, the store kept in step, frames to members.

- **Counts.** The hub reports every subscription that starts or ends (``entered``,
  ``exited``). A (conversation, user) pair is online here while it has at least one; only the
  first and the last reach the store, one pair at a time (``_sync``), so a user's second tab
  or a quick leave and rejoin costs nothing or one step, in order.
- **Changes.** The store says when a pair's change made the user go on- or offline. The
  conversation is then *dirty* here; if another instance has a member joined, it is told with
  one ``PresenceChanged`` on the conversation's channel (its members' instances mark it
  dirty too).
- **Coalesced.** Dirty conversations are refreshed once per ``interval_s``: one read of the
  online list per conversation, one ``presence`` frame to each member whose last one differs.
  A reconnect storm (members gone and back within the interval) sends nothing; a change
  reaches every member within about two intervals.
- **Joins.** A join gets its own frame right after ``joined`` (``welcome``): the same reads,
  one at a time per conversation, so a member never gets an older list after a newer one.
- **Renewal.** Every third of the TTL the held pairs are renewed; the store drops other
  instances' expired entries and reports the conversations that changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from protocol import Presence

from ..errors import DEPENDENCY_ERRORS
from ..fanout.envelope import PresenceChanged
from ..fanout.events import Event
from ..fanout.hub import LocalHub
from ..fanout.session import Session
from .base import Change, PresenceStore

log = logging.getLogger("chatserver.presence")

Announce = Callable[[str, PresenceChanged], Awaitable[None]]
Key = tuple[str, str]  # (conversation id, user id)


class _Reads:
    """The reads of one conversation's online list: one at a time, requests coalesced."""

    __slots__ = ("everyone", "next", "sessions", "task")

    def __init__(self) -> None:
        self.task: asyncio.Task[None] | None = None
        self.next: asyncio.Future[None] | None = None  # done when the next read delivered
        self.everyone = False  # the next read goes to every member whose list differs
        self.sessions: set[Session] = set()  # ... or to these (joins)


class PresenceTracker:
    def __init__(
        self,
        store: PresenceStore,
        hub: LocalHub,
        *,
        server_id: str,
        ttl_s: float,
        interval_s: float,
        announce: Announce | None = None,
        on_frame: Callable[[], None] | None = None,
    ) -> None:
        self.store = store
        self._hub = hub
        self.server_id = server_id
        self.ttl_s = ttl_s
        self.interval_s = interval_s
        self._announce = announce
        self._on_frame = on_frame
        self._count: dict[Key, int] = {}
        self._entered: set[Key] = set()  # pairs the store holds for us
        self._syncing: dict[Key, asyncio.Task[None]] = {}
        self._dirty: set[str] = set()
        self._to_announce: set[str] = set()
        self._wake = asyncio.Event()
        self._reads: dict[str, _Reads] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self.frames = 0  # presence frames queued to members (tests, metrics)

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._flush_loop(), name="presence-flush"),
            asyncio.create_task(self._renew_loop(), name="presence-renew"),
        ]

    async def close(self, timeout_s: float = 5.0) -> None:
        """Stop; the exits of connections closed meanwhile still reach the store (bounded)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self._syncing and loop.time() < deadline:
            with contextlib.suppress(Exception):
                await asyncio.wait(list(self._syncing.values()), timeout=deadline - loop.time())
        with contextlib.suppress(*DEPENDENCY_ERRORS):
            await self._announce_pending()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for reads in list(self._reads.values()):
            if reads.task is not None:
                reads.task.cancel()
        await self.store.close()

    # -- what the hub reports ----------------------------------------------------------

    def entered(self, session: Session, conversation_id: str) -> None:
        key = (conversation_id, session.user_id)
        self._count[key] = self._count.get(key, 0) + 1
        if self._count[key] == 1:
            self._sync(key)

    def exited(self, session: Session, conversation_id: str) -> None:
        key = (conversation_id, session.user_id)
        left = self._count.get(key, 0) - 1
        if left > 0:
            self._count[key] = left
            return
        self._count.pop(key, None)
        self._sync(key)
        reads = self._reads.get(conversation_id)
        if reads is not None:
            reads.sessions.discard(session)

    def idle(self) -> bool:
        """Nothing under way: the store is in step, and every change went out (tests)."""
        return not (self._dirty or self._syncing or self._reads or self._to_announce)

    def held(self) -> dict[str, list[str]]:
        """The users this instance holds joined, by conversation."""
        out: dict[str, list[str]] = {}
        for conversation_id, user_id in self._count:
            out.setdefault(conversation_id, []).append(user_id)
        return out

    # -- the store, kept in step ---------------------------------------------------------

    def _sync(self, key: Key) -> None:
        if key not in self._syncing:
            task = asyncio.get_running_loop().create_task(self._sync_pair(key))
            self._syncing[key] = task

    async def _sync_pair(self, key: Key) -> None:
        conversation_id, user_id = key
        try:
            while True:
                want = key in self._count
                if want == (key in self._entered):
                    return
                try:
                    if want:
                        change = await self.store.enter(conversation_id, user_id)
                        self._entered.add(key)
                    else:
                        # Not renewed from here on, even if this fails: it expires.
                        self._entered.discard(key)
                        change = await self.store.exit(conversation_id, user_id)
                except DEPENDENCY_ERRORS as exc:
                    log.warning("presence not updated (renewal retries): %r", exc)
                    return
                if change is not None:
                    self.changed(change)
        finally:
            self._syncing.pop(key, None)

    async def _renew_loop(self) -> None:
        while True:
            await asyncio.sleep(self.ttl_s / 3)
            for key in set(self._count) - self._entered:
                self._sync(key)  # an enter that failed (Redis was away): again
            held: dict[str, list[str]] = {}
            for conversation_id, user_id in self._entered:
                held.setdefault(conversation_id, []).append(user_id)
            try:
                changes = await self.store.renew(held)
            except DEPENDENCY_ERRORS as exc:
                log.warning("presence not renewed: %r", exc)
                continue
            for change in changes:
                self.changed(change)

    # -- changes, coalesced ----------------------------------------------------------------

    def changed(self, change: Change) -> None:
        """The online list changed through this instance."""
        if change.announce:
            self._to_announce.add(change.conversation_id)
        self.noticed(change.conversation_id)

    def on_control(self, message: PresenceChanged) -> None:
        """Another instance changed the list of a conversation we have members in."""
        if message.origin != self.server_id:
            self.noticed(message.conversation_id)

    def noticed(self, conversation_id: str) -> None:
        self._dirty.add(conversation_id)
        self._wake.set()

    async def _flush_loop(self) -> None:
        while True:
            await self._wake.wait()
            await asyncio.sleep(self.interval_s)  # what else changes meanwhile goes along
            self._wake.clear()
            try:
                await self._announce_pending()
            except DEPENDENCY_ERRORS as exc:
                log.warning("presence change not announced: %r", exc)
            dirty, self._dirty = self._dirty, set()
            for conversation_id in dirty:
                if self._hub.room(conversation_id):
                    self._request(conversation_id, None)

    async def _announce_pending(self) -> None:
        pending, self._to_announce = self._to_announce, set()
        if self._announce is None:
            return
        for conversation_id in pending:
            await self._announce(conversation_id, PresenceChanged(conversation_id, self.server_id))

    # -- reads and frames ------------------------------------------------------------------

    async def welcome(self, session: Session, conversation_id: str) -> None:
        """After ``joined``: the joiner's own entry in the store, then its presence frame.

        Shielded: a caller that stops waiting (a timeout) leaves both to finish, and the
        frame still goes to the joiner; other joins waiting on the same read are not touched.
        """
        syncing = self._syncing.get((conversation_id, session.user_id))
        if syncing is not None:
            await asyncio.shield(syncing)
        await asyncio.shield(self._request(conversation_id, session))

    def _request(self, conversation_id: str, session: Session | None) -> asyncio.Future[None]:
        reads = self._reads.get(conversation_id)
        if reads is None:
            reads = self._reads[conversation_id] = _Reads()
        if session is None:
            reads.everyone = True
        else:
            reads.sessions.add(session)
        if reads.next is None:
            reads.next = asyncio.get_running_loop().create_future()
        future = reads.next
        if reads.task is None:
            reads.task = asyncio.get_running_loop().create_task(
                self._read_loop(conversation_id, reads)
            )
        return future

    async def _read_loop(self, conversation_id: str, reads: _Reads) -> None:
        try:
            while reads.next is not None:
                done, reads.next = reads.next, None
                everyone, reads.everyone = reads.everyone, False
                sessions, reads.sessions = reads.sessions, set()
                try:
                    online = await self.store.online(conversation_id)
                except DEPENDENCY_ERRORS as exc:
                    log.warning("presence not read: %r", exc)
                    self.noticed(conversation_id)  # tried again at the next flush
                else:
                    self._deliver(conversation_id, online, everyone, sessions)
                if not done.done():
                    done.set_result(None)
        finally:
            reads.task = None
            if reads.next is None and self._reads.get(conversation_id) is reads:
                del self._reads[conversation_id]

    def _deliver(
        self,
        conversation_id: str,
        online: tuple[str, ...],
        everyone: bool,
        sessions: set[Session],
    ) -> None:
        event: Event | None = None
        for session, sub in self._hub.room(conversation_id).items():
            if not everyone and session not in sessions:
                continue
            if sub.held is not None or sub.presence == online:
                continue  # still joining (its welcome follows), or told already
            if event is None:
                event = Event(conversation_id, Presence(conversation_id, online).to_dict())
            sub.presence = online
            session.outbound.push(event.framed(session.encoding.binary))
            self.frames += 1
            if self._on_frame is not None:
                self._on_frame()
