"""The model interface: an async stream of text chunks that ends with a finish."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from protocol import Message, Usage


@dataclass(frozen=True, slots=True)
class ReplyRequest:
    agent_id: str
    model: str
    system_prompt: str
    history: Sequence[Message]  # the conversation's recent window, oldest first
    temperature: float
    max_output_tokens: int


@dataclass(frozen=True, slots=True)
class Chunk:
    text: str


@dataclass(frozen=True, slots=True)
class Finish:
    reason: str  # a protocol FinishReason value
    usage: Usage
    error: str | None = None


StreamItem = Chunk | Finish


class Provider(Protocol):
    name: str

    def stream(self, request: ReplyRequest) -> AsyncIterator[StreamItem]:
        """Yield chunks, then exactly one ``Finish``. Cancelling the consuming task must
        stop the upstream call at once."""
        ...

    async def close(self) -> None: ...

    def healthy(self) -> bool: ...
