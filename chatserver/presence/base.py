"""Presence: who of a conversation's members is online, on any instance.

A member is online in a conversation while one of their connections, on any instance, has
joined it. Each instance tells the store when a user's first local connection joins a
conversation (``enter``) and when the last one leaves or closes (``exit``); the store keeps
one entry per (instance, user) and says whether the user's online state changed. Entries of a
shared store expire unless renewed (``renew``), so a dead instance's users drop out.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Protocol

from protocol.record import record


@record
class Change:
    """The conversation's online list changed; ``announce``: another instance has a member
    joined there and must be told (with one instance, or alone, nobody else needs to)."""

    conversation_id: str
    announce: bool


class PresenceStore(Protocol):
    name: str
    shared: bool  # other instances see the entries (and theirs expire)

    async def enter(self, conversation_id: str, user_id: str) -> Change | None:
        """This instance holds a joined connection of the user: a Change when the user was
        offline in the conversation before."""

    async def exit(self, conversation_id: str, user_id: str) -> Change | None:
        """This instance holds none any more: a Change when the user is offline now."""

    async def online(self, conversation_id: str) -> tuple[str, ...]:
        """The users online in the conversation, sorted."""

    async def renew(self, held: Mapping[str, Collection[str]]) -> list[Change]:
        """Keep this instance's entries (conversation -> users) alive, and drop the expired
        entries of the same conversations: a Change for each where someone went offline or
        (an entry lost meanwhile) came back."""

    async def close(self) -> None: ...
