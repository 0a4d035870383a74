"""``cancel_and_wait``: a task cancelled and waited for, its caller still cancellable."""

from __future__ import annotations

import asyncio

from chatclient.client import cancel_and_wait


async def _slow_to_stop(stopping: asyncio.Event) -> None:
    """Ends a while after its cancel (a socket closing, a sender's last write)."""
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        stopping.set()
        await asyncio.sleep(0.2)
        raise


async def test_the_caller_s_own_cancel_goes_through_while_it_waits() -> None:
    """A loop that stops a helper task each round (a member's sender at each reconnect) is
    cancelled while it waits for the helper: it ends. Before, the wait suppressed every
    ``CancelledError``, its own too, and the loop went on for ever (a chaos run that ended
    in an error hung on cancelling its members)."""
    stopping = asyncio.Event()

    async def loop_of_sessions() -> None:
        while True:
            helper = asyncio.create_task(_slow_to_stop(stopping))
            await asyncio.sleep(0)  # the helper is running
            await cancel_and_wait(helper)

    caller = asyncio.create_task(loop_of_sessions())
    await asyncio.wait_for(stopping.wait(), 5)  # the caller waits for its helper now
    caller.cancel()
    done, _ = await asyncio.wait({caller}, timeout=5)
    assert done == {caller} and caller.cancelled()


async def test_the_task_s_own_end_is_waited_for_and_its_error_dropped() -> None:
    async def fails_when_cancelled() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            raise RuntimeError("closing failed") from None

    task = asyncio.create_task(fails_when_cancelled())
    await asyncio.sleep(0)
    await cancel_and_wait(task)  # neither its cancel nor its error reaches the caller
    assert task.done() and isinstance(task.exception(), RuntimeError)
