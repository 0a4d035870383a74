"""The embedded model: deterministic replies streamed word by word at a set pace."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from protocol import FinishReason, Role, Usage

from .provider import Chunk, Finish, ReplyRequest, StreamItem


def count_tokens(text: str) -> int:
    return len(text.split())


def compose_reply(request: ReplyRequest) -> str:
    """Echo the latest user message and transform it, so a test can predict every word."""
    last = next((m for m in reversed(request.history) if m.role == Role.USER.value), None)
    said = last.text.strip() if last is not None else ""
    if not said:
        return "I am listening. Say something and I will answer."
    words = said.split()
    return (
        f"You said: {said} "
        f"Backwards, that is: {' '.join(reversed(words))} "
        f"That was {len(words)} words and {len(said)} characters."
    )


class LocalProvider:
    name = "local"

    def __init__(self, ttft_ms: int = 150, token_ms: int = 15) -> None:
        self.ttft_s = ttft_ms / 1000
        self.token_s = token_ms / 1000
        self.active = 0  # streams running now: tests watch a cancel reach the provider

    async def stream(self, request: ReplyRequest) -> AsyncIterator[StreamItem]:
        self.active += 1
        try:
            text = compose_reply(request)
            prompt = request.system_prompt + " " + " ".join(m.text for m in request.history)
            words = text.split(" ")
            limit = request.max_output_tokens
            reason = FinishReason.STOP.value
            if len(words) > limit:
                words = words[:limit]
                reason = FinishReason.LENGTH.value
            await asyncio.sleep(self.ttft_s)
            for index, word in enumerate(words):
                if index:
                    await asyncio.sleep(self.token_s)
                yield Chunk(word if index == len(words) - 1 else word + " ")
            yield Finish(reason, Usage(count_tokens(prompt), len(words)))
        finally:
            self.active -= 1

    async def close(self) -> None:
        return None

    def healthy(self) -> bool:
        return True
