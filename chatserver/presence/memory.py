"""Presence in one process (embedded mode): nobody else holds entries, none expire."""

from __future__ import annotations

from collections.abc import Collection, Mapping

from .base import Change


class MemoryPresence:
    name = "memory"
    shared = False

    def __init__(self) -> None:
        self._online: dict[str, set[str]] = {}

    async def enter(self, conversation_id: str, user_id: str) -> Change | None:
        users = self._online.setdefault(conversation_id, set())
        if user_id in users:
            return None
        users.add(user_id)
        return Change(conversation_id, announce=False)

    async def exit(self, conversation_id: str, user_id: str) -> Change | None:
        users = self._online.get(conversation_id)
        if users is None or user_id not in users:
            return None
        users.discard(user_id)
        if not users:
            del self._online[conversation_id]
        return Change(conversation_id, announce=False)

    async def online(self, conversation_id: str) -> tuple[str, ...]:
        return tuple(sorted(self._online.get(conversation_id, ())))

    async def renew(self, held: Mapping[str, Collection[str]]) -> list[Change]:
        return []

    async def close(self) -> None:
        self._online.clear()
