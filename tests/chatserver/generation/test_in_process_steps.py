"""On one instance (memory buffer, window and limiter) a reply's own steps never give up the
loop: its slot, its context, storing its answer and releasing its slot each return at once.

Gathered, or awaited past a real suspension, each would wait for loop passes, and on a busy
loop every pass is all of its I/O: that cost the first token ~17 ms at 300 replies
(docs/benchmarks.md). A step that suspends is caught here by driving it by hand."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from chatserver import keys

from ..conftest import MakeHarness


def _never_suspends(
    step: Callable[..., Coroutine[Any, Any, Any]], suspended: list[str]
) -> Callable[..., Coroutine[Any, Any, Any]]:
    """``step``, run to its end in one go; its name in ``suspended`` if it could not be."""

    async def driven(*args: Any) -> Any:
        coro = step(*args)
        try:
            coro.send(None)
        except StopIteration as done:
            return done.value
        coro.close()
        suspended.append(step.__name__)
        raise AssertionError(f"{step.__name__} waited for the loop")

    return driven


async def test_a_reply_on_one_instance_takes_its_slot_and_stores_its_answer_at_once(
    make_harness: MakeHarness,
) -> None:
    harness = await make_harness(local_ttft_ms=20)
    manager = harness.app[keys.GENERATION]
    assert manager._buffer.in_process
    suspended: list[str] = []
    for name in ("_slot_and_context", "_finalize"):
        setattr(manager, name, _never_suspends(getattr(manager, name), suspended))
    conv = await harness.conversation("alice")
    alice = await harness.connect("alice")
    await alice.join(conv)
    for text in ("a first question", "and a second, with the first in its context"):
        sent = await alice.send(conv, text)
        try:
            reply = await alice.reply(sent.message_id, timeout=10)
        except TimeoutError:  # a step that suspended failed the reply: say which
            pytest.fail(f"no reply; steps that waited for the loop: {suspended}")
        assert reply.end is not None and reply.end.finish_reason == "stop"
        assert reply.end.message is not None
        assert reply.text.startswith(f"You said: {text}")
    assert suspended == []
