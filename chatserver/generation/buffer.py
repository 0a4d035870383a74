"""Resume buffers: the text so far of each running reply, for clients joining mid-stream."""

from __future__ import annotations

from typing import Protocol

from protocol import GenerationSnapshot


class ReplyBuffer(Protocol):
    name: str

    async def begin(self, conversation_id: str, generation_id: str, owner: str) -> None: ...

    async def append(self, conversation_id: str, generation_id: str, seq: int, text: str) -> None:
        """Record delta ``seq`` (its text) before it is published."""

    async def snapshot(self, conversation_id: str) -> GenerationSnapshot | None: ...

    async def end(self, conversation_id: str, generation_id: str) -> None: ...


class _Running:
    __slots__ = ("generation_id", "parts", "seq")

    def __init__(self, generation_id: str) -> None:
        self.generation_id = generation_id
        self.seq = 0
        self.parts: list[str] = []


class MemoryReplyBuffer:
    name = "memory"

    def __init__(self) -> None:
        self._running: dict[str, _Running] = {}

    async def begin(self, conversation_id: str, generation_id: str, owner: str) -> None:
        self._running[conversation_id] = _Running(generation_id)

    async def append(self, conversation_id: str, generation_id: str, seq: int, text: str) -> None:
        running = self._running.get(conversation_id)
        if running is None or running.generation_id != generation_id:
            return
        running.seq = seq
        running.parts.append(text)

    async def snapshot(self, conversation_id: str) -> GenerationSnapshot | None:
        running = self._running.get(conversation_id)
        if running is None:
            return None
        return GenerationSnapshot(running.generation_id, running.seq, "".join(running.parts))

    async def end(self, conversation_id: str, generation_id: str) -> None:
        running = self._running.get(conversation_id)
        if running is not None and running.generation_id == generation_id:
            del self._running[conversation_id]
