"""What other instances ask of this one's replies, and what it asks of theirs: cancel
through the owner's control channel, watch/ack for a join elsewhere mid-reply, the join
snapshot of a running reply.
"""

from __future__ import annotations

import asyncio

from protocol import (
    FinishReason,
    GenerationSnapshot,
)

from ..fanout.envelope import CancelReply, Control, WatchAck, WatchReply
from .buffer import ReplyOwner
from .manager_state import (
    WATCH_ACK_TIMEOUT_S,
    ManagerState,
    log,
)
from .streaming import ReplyRun


class _Remote(ManagerState):
    def cancel_local(self, generation_id: str) -> bool:
        run = self._runs.get(generation_id)
        return run is not None and run.stop(FinishReason.CANCELLED)

    async def locate(self, generation_id: str) -> ReplyOwner | None:
        """Who streams this reply: this instance or, through the buffer, another one."""
        run = self._runs.get(generation_id)
        if run is not None:
            return run.owner(self._server_id)
        return await self._buffer.owner_of(generation_id)

    async def cancel(self, owner: ReplyOwner) -> None:
        """Stop a reply wherever it runs: here at once, elsewhere through the broker."""
        if owner.owner == self._server_id or self._send_control is None:
            self.cancel_local(owner.generation_id)
            return
        await self._send_control(owner.owner, CancelReply(owner.generation_id))

    def on_control(self, message: Control) -> None:
        if isinstance(message, CancelReply):
            self.cancel_local(message.generation_id)
        elif isinstance(message, WatchReply):
            self._on_watch(message)
        elif isinstance(message, WatchAck):
            for waiter in self._acks.pop(message.generation_id, ()):
                if not waiter.done():
                    waiter.set_result(None)

    def _on_watch(self, message: WatchReply) -> None:
        run = self._live.get(message.generation_id)
        if run is not None and not run.watched:
            self._pump.resync(run)  # the pump announces once the text is recorded
            return
        # Watched already (every delta recorded), or over and stored: Redis is current.
        if self._announce is not None:
            task = asyncio.create_task(self._ack_now(message))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _ack_now(self, message: WatchReply) -> None:
        assert self._announce is not None
        ack = WatchAck(message.conversation_id, message.generation_id, 0)
        await self._announce(message.conversation_id, ack)

    async def _announce_synced(self, run: ReplyRun) -> None:
        assert self._announce is not None
        ack = WatchAck(run.conversation_id, run.generation_id, run.seq)
        await self._announce(run.conversation_id, ack)

    async def join_snapshot(self, conversation_id: str) -> GenerationSnapshot | None:
        """The reply in progress, for a join: every character up to its ``seq`` is in it,
        every later one is published to this instance (the join's floors do the rest)."""
        run = self._live_in.get(conversation_id)
        if run is not None:  # ours: the text is here, the buffer may hold a checkpoint
            return GenerationSnapshot(run.generation_id, run.seq, "".join(run.parts))
        running = await self._buffer.running(conversation_id)
        if running is None or running.watched or running.owner == self._server_id:
            return running.snapshot if running is not None else None
        # Unwatched by another instance: it records nothing per delta. Our watchers entry
        # is in (the join subscribed first), so ask it to record and publish from now on.
        gen = running.snapshot.generation_id
        waiter = asyncio.get_running_loop().create_future()
        self._acks.setdefault(gen, []).append(waiter)
        try:
            if self._send_control is not None:
                await self._send_control(running.owner, WatchReply(conversation_id, gen))
            # asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow a cancel
            async with asyncio.timeout(WATCH_ACK_TIMEOUT_S):
                await waiter
        except TimeoutError:
            log.warning("no watch_ack from %s: joining on its checkpoint", running.owner)
        finally:
            waiters = self._acks.get(gen)
            if waiters is not None and waiter in waiters:
                waiters.remove(waiter)
                if not waiters:
                    del self._acks[gen]
        return await self._buffer.snapshot(conversation_id)
