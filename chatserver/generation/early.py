"""A question's model call, begun beside its append instead of after it.

In production a question's append is a round trip to Redis (the window, the outbox, its job,
the reply's slot and the context, in one script). Under load that round trip was most of
the time to the first token: 2.5-3.5 ms of the 5 added at 300 concurrent replies, the rest
being the model's own wait. The instance usually knows the context already: the messages of
the conversation's last context read, kept decoded, and the answer it appended since
(storage/window/decoded.py). So when a send arrives the model call starts at once, with
that context and the question, and the append runs meanwhile.

Nothing of the call is shown before a reply's run adopts it: the run is made once the
append is done, takes (or has) the slot and reads the context as always, then compares the
request it would send with the one sent (``same_prompt``). The same prompt: the call is
adopted, and what the model sent meanwhile goes to the run first. Another prompt (another
message came between, the window was rebuilt): the call is cancelled and the run makes its
own. A send refused, a resend, a question parked behind another: the call is cancelled. A
call nobody adopted within ``ADOPT_WITHIN_S`` cancels itself.

A push provider pushes into the call until it is adopted (the local model: a word per pace,
so a few at most). A pull provider (Gemini) is asked for its first item only; the rest is
read once a run adopts it, so nothing piles up here.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable

from protocol import Message

from ..agents import Agent
from .provider import (
    Finish,
    OpenedStream,
    Provider,
    PushProvider,
    ReplyRequest,
    StreamItem,
)
from .sources import start_stream_from
from .streaming import ReplyRun

ADOPT_WITHIN_S = 10.0  # longer means the append or the slot waited: the context moved on


def reply_request(agent: Agent, model: str, history: tuple[Message, ...]) -> ReplyRequest:
    """What a reply of ``agent`` asks ``model``: the run's request and the early call's."""
    return ReplyRequest(
        agent_id=agent.id,
        model=model,
        system_prompt=agent.system_prompt,
        history=history,
        temperature=agent.temperature,
        max_output_tokens=agent.max_output_tokens,
        thinking_budget=agent.thinking_budget,
    )


def same_prompt(a: ReplyRequest, b: ReplyRequest) -> bool:
    """Whether the model sees the same thing: the history by role and text (the early call's
    question has no id or offset yet), everything else as is."""
    return (
        a.agent_id == b.agent_id
        and a.model == b.model
        and a.system_prompt == b.system_prompt
        and a.temperature == b.temperature
        and a.max_output_tokens == b.max_output_tokens
        and a.thinking_budget == b.thinking_budget
        and len(a.history) == len(b.history)
        and all(
            m is n or (m.role == n.role and m.text == n.text)
            for m, n in zip(a.history, b.history, strict=True)
        )
    )


class EarlyCall:
    """The model call of a question whose reply has no run yet."""

    __slots__ = (
        "_chunks",
        "_finish",
        "_first",
        "_handle",
        "_items",
        "_on_end",
        "_timer",
        "over",
        "request",
    )

    def __init__(
        self,
        provider: Provider,
        push: PushProvider | None,
        request: ReplyRequest,
        on_end: Callable[[EarlyCall, bool], None],
    ) -> None:
        self.request = request
        self._on_end = on_end
        self._chunks: list[str] = []
        self._finish: Finish | None = None
        self._handle: OpenedStream | None = None
        self._items: AsyncIterator[StreamItem] | None = None
        self._first: asyncio.Task[StreamItem] | None = None
        self.over = False  # adopted or cancelled
        loop = asyncio.get_running_loop()
        if push is not None:
            self._handle = push.open(request, self)
        else:
            items = self._items = provider.stream(request)
            self._first = loop.create_task(_first_item(items), name="early-model-call")
            # A failure nobody adopted is not logged as never retrieved; an adopting run
            # gets it from the task itself (a model error, retried as usual).
            self._first.add_done_callback(_retrieve)
        # Set once the call is begun: a provider that raised above leaves nothing behind.
        self._timer = loop.call_later(ADOPT_WITHIN_S, self.cancel)

    # -- the push provider's sink until adopted (then it pushes into the run) ---------

    def chunk(self, text: str) -> None:
        if not self.over:
            self._chunks.append(text)

    def finish(self, finish: Finish) -> None:
        if not self.over:
            self._finish = finish

    # -------------------------------------------------------------------------------

    def adopt(self, run: ReplyRun, request: ReplyRequest) -> bool:
        """Hand the call to ``run`` if it asked the model what ``request`` asks (else it is
        cancelled); whether it did. ``run.handle`` is the call's then."""
        if self.over or not same_prompt(self.request, request):
            self.cancel()
            return False
        self._end(adopted=True)
        if self._first is not None:
            assert self._items is not None
            start_stream_from(_resumed(self._first, self._items), run)
            return True
        handle = self._handle
        assert handle is not None
        run.handle = handle
        self._handle = None  # the run holds it now, and it pushes into the run
        handle.redirect(run)
        chunks, self._chunks = self._chunks, []
        for text in chunks:
            run.chunk(text)
        if self._finish is not None:
            run.finish(self._finish)
        return True

    def cancel(self) -> None:
        """Stop the call (nothing of it was shown); a no-op once adopted or cancelled."""
        if self.over:
            return
        self._end(adopted=False)
        self._chunks = []
        if self._handle is not None:
            self._handle.cancel()
        if self._first is not None:
            first, items = self._first, self._items
            first.cancel()
            # Closed once the first item's task is over: a generator still running refuses.
            first.add_done_callback(lambda _: _close_later(items))

    def _end(self, *, adopted: bool) -> None:
        self.over = True
        self._timer.cancel()
        self._on_end(self, adopted)


def _retrieve(first: asyncio.Task[StreamItem]) -> None:
    if not first.cancelled():
        first.exception()


async def _first_item(items: AsyncIterator[StreamItem]) -> StreamItem:
    return await items.__anext__()


async def _resumed(
    first: asyncio.Task[StreamItem], items: AsyncIterator[StreamItem]
) -> AsyncIterator[StreamItem]:
    """The call's items: the first one asked for early, then the rest."""
    try:
        item = await first
    except StopAsyncIteration:
        return
    yield item
    async for item in items:
        yield item


def _close_later(items: AsyncIterator[StreamItem] | None) -> None:
    if isinstance(items, AsyncGenerator):
        task = asyncio.get_running_loop().create_task(_close(items))
        _closing.add(task)
        task.add_done_callback(_closing.discard)


_closing: set[asyncio.Task[None]] = set()


async def _close(items: AsyncGenerator[StreamItem, None]) -> None:
    with contextlib.suppress(Exception):
        await items.aclose()
