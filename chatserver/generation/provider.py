"""The model interface: an async stream of text chunks that ends with a finish.

Every provider offers ``stream()`` (pull: an async iterator, consumed by a task). A provider
that runs inside the event loop may also offer ``open()`` (push: it calls a sink from its own
callbacks), so a reply costs no task, queue or timer of its own; the manager uses ``open``
when it is there.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Protocol, runtime_checkable

import aiohttp

from protocol import FinishReason, Message, Usage
from protocol.record import record


@record
class ReplyRequest:
    agent_id: str
    model: str
    system_prompt: str
    history: Sequence[Message]  # the conversation's recent window, oldest first
    temperature: float
    max_output_tokens: int  # thinking included (Gemini counts thoughts against it)
    thinking_budget: int | None = None  # 0 off, -1 dynamic, None: the model's default


@record
class Chunk:
    text: str


@record
class Finish:
    reason: FinishReason
    usage: Usage
    error: str | None = None
    retryable: bool = False  # an error worth another attempt (see ``is_retryable``)
    error_code: str | None = None  # a ``protocol.ReplyErrorCode``, when the kind is known
    retry_after_ms: int | None = None  # when asking the model again may succeed
    thinking_tokens: int = 0  # of ``usage.output_tokens``, spent thinking


# The model's answers worth another attempt of the whole reply (after the provider's own
# request retries): timeouts, rate limits and server errors. A 4xx other than 408 and 429
# is the request's fault (bad key, bad model, blocked prompt): asking again gives the same.
RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})


def is_retryable(exc: BaseException) -> bool:
    """Whether a reply that failed with ``exc`` before its first chunk may be tried again:
    an HTTP status in ``RETRYABLE_STATUS`` (``GeminiStreamError`` or the SDK's ``APIError``,
    both with ``code``, also an ``error`` event inside a stream), a timeout, a connection
    that could not be made or was cut."""
    code = getattr(exc, "code", None)
    if isinstance(code, int):
        return code in RETRYABLE_STATUS
    return isinstance(exc, (TimeoutError, ConnectionError, aiohttp.ClientError))


StreamItem = Chunk | Finish


class Provider(Protocol):
    name: str
    # Whether closing a stream between items (``aclose`` at a ``yield``) stops the upstream
    # call at once, as cancelling its consumer does: an early call (early.py) is closed so.
    closes_between_items: bool

    def stream(self, request: ReplyRequest) -> AsyncIterator[StreamItem]:
        """Yield chunks, then exactly one ``Finish``. Cancelling the consuming task must
        stop the upstream call at once."""
        ...

    async def close(self) -> None: ...

    def healthy(self) -> bool: ...

    def thinks(self, model: str, thinking_budget: int | None) -> bool:
        """Whether a reply of ``model`` may think before its first chunk (a long silence:
        ``gen_start.thinking`` tells the clients, the first chunk is waited for longer)."""
        ...

    @property
    def probe(self) -> Callable[[], Awaitable[object]] | None:
        """A cheap call to the upstream (cached) for the health check, or None when
        ``healthy()`` tells all there is (an embedded model)."""


class ChunkSink(Protocol):
    """Where a pushed stream goes: chunks in order, then exactly one finish."""

    def chunk(self, text: str) -> None: ...

    def finish(self, finish: Finish) -> None: ...


class PushStream(Protocol):
    """A pushed stream; once it finished or was cancelled it holds its sink no more (the
    sink, a reply's run, holds the stream: a reference left both ways would make every reply
    a cycle that only a full collection frees)."""

    def cancel(self) -> None:
        """Stop at once: the sink is called no more after this returns."""


class OpenedStream(PushStream, Protocol):
    """What a push provider opens: a stream whose sink can change (an early call taken by
    its reply's run: the words go to the run itself from then on)."""

    def redirect(self, sink: ChunkSink) -> None:
        """Push into ``sink`` from now on; a no-op once the stream is over."""


@runtime_checkable
class PushProvider(Protocol):
    """A provider that can also push: ``open`` starts a stream calling ``sink`` from the loop."""

    def open(self, request: ReplyRequest, sink: ChunkSink) -> OpenedStream: ...
