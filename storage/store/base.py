"""The store of record: users, conversations, members, messages, usage."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from protocol import Message

from ..records import Conversation, ConversationPage, MessagePage, User


class StoreUnavailable(Exception):
    """The store cannot be reached or refused the operation; the caller may retry later."""


PoolStats = tuple[int, int, int]  # open connections, checked out, most allowed


class Store(Protocol):
    name: str

    async def start(self) -> None:
        """Open connections and make the schema ready."""

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Return when the store answers; raise ``StoreUnavailable`` otherwise."""

    def pool_stats(self) -> Mapping[str, PoolStats]:
        """The store's open connection pools by name (``primary``, ``replica``); empty for a
        store without pools."""

    async def ensure_user(self, user_id: str, tier: str, role: str) -> None:
        """Create the user row if missing; never downgrades an existing one."""

    async def get_user(self, user_id: str) -> User | None:
        """The user row as stored (``ensure_user`` made it), or None."""

    async def create_conversation(self, conversation: Conversation) -> None: ...

    async def get_conversation(self, conversation_id: str) -> Conversation | None: ...

    async def get_conversations(self, conversation_ids: Sequence[str]) -> dict[str, Conversation]:
        """Those of ``conversation_ids`` that exist, by id, in one read (the conversation
        cache's refresh of every entry that came due together)."""
        ...

    async def list_conversations(
        self, user_id: str, cursor: str | None, limit: int
    ) -> ConversationPage:
        """The user's conversations, most recently updated first, keyset-paged.

        ``cursor`` is the opaque ``next_cursor`` of the previous page; an invalid cursor
        raises ``ValueError``.
        """
        ...

    async def write_messages(self, messages: Sequence[Message]) -> int:
        """Persist a batch in one transaction; replaying stored messages is harmless.

        Also moves each conversation's ``updated_at`` to its newest message and adds the
        usage of assistant messages to the daily usage of the user they replied to.
        Returns how many messages were new.
        """
        ...

    async def messages_before(
        self, conversation_id: str, before: int | None, limit: int
    ) -> MessagePage:
        """The newest ``limit`` messages with offset < ``before`` (all when None), oldest first."""
        ...

    async def max_offset(self, conversation_id: str) -> int:
        """The highest stored offset of the conversation, 0 when it has none."""
        ...

    async def find_by_client_msg_id(
        self, conversation_id: str, user_id: str | None, client_msg_id: str
    ) -> Message | None:
        """The stored message of (user, client_msg_id); a reply's with ``user_id`` None
        (its client_msg_id is its generation id)."""
        ...

    async def unanswered(self, within_s: float, limit: int = 10_000) -> list[Message]:
        """Users' messages of the last ``within_s`` seconds that no stored reply answers
        (``reply_to``), oldest first per conversation: an embedded restart answers them."""
        ...

    async def remove_member(self, conversation_id: str, user_id: str) -> bool:
        """Take the user out of the conversation's members; False when it was not one."""
        ...

    async def count_owned_conversations(self, user_id: str) -> int:
        """How many conversations the user owns (created); fresh, from the primary."""
        ...

    async def usage_on(self, user_id: str, day: str) -> int:
        """Tokens (input + output) used by the user on that UTC day (``YYYY-MM-DD``)."""
        ...
