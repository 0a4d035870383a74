"""Records the storage layer exchanges with the server, beside the protocol's Message."""

from __future__ import annotations

from dataclasses import field
from typing import Any

from protocol import Message, Usage
from protocol.record import record


@record
class User:
    id: str
    tier: str
    role: str


@record
class Conversation:
    id: str
    agent_id: str
    title: str
    owner_id: str
    members: tuple[str, ...]
    created_at: str  # RFC 3339 UTC milliseconds, as on the wire
    updated_at: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "agent_id": self.agent_id,
            "title": self.title,
            "owner_id": self.owner_id,
            "members": list(self.members),
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }


@record
class ConversationPage:
    items: tuple[Conversation, ...]
    next_cursor: str | None
    has_more: bool


@record
class MessagePage:
    messages: tuple[Message, ...]  # oldest first
    has_more: bool  # older messages exist before the first one


@record
class MessageDraft:
    """A message before the window gives it an id, an offset and a time."""

    conversation_id: str
    role: str
    text: str
    user_id: str | None = None
    agent_id: str | None = None
    client_msg_id: str | None = None
    finish_reason: str | None = None
    usage: Usage | None = None
    model: str | None = None
    reply_to: str | None = None

    def complete(self, message_id: str, offset: int, created_at: str) -> Message:
        """The message this draft becomes once the window gave it its place and time."""
        return Message(
            id=message_id,
            conversation_id=self.conversation_id,
            offset=offset,
            role=self.role,
            text=self.text,
            created_at=created_at,
            user_id=self.user_id,
            agent_id=self.agent_id,
            client_msg_id=self.client_msg_id,
            finish_reason=self.finish_reason,
            usage=self.usage,
            model=self.model,
            reply_to=self.reply_to,
        )


@record
class AppendResult:
    message: Message
    duplicate: bool
    job_id: str | None = None  # the reply job written with the append (a question)
    job_done: bool = False  # the job it answers was finished in the same step (an answer)
    # No older job of the conversation was listed: it may go without asking for its turn
    # (windows that can tell, in the same step; else False and the caller asks).
    job_first: bool = False
    # The window published it to the other instances in the same step: the caller delivers it
    # to its own members only.
    fanned_out: bool = False
    # What the append's follow returned (storage.window.base.AppendFollow); None: it did not
    # run (none given, or the question's job was not alone in line). When it returned a
    # table, it stands for the question's job: ``job_id`` is None.
    followed: Any = None


@record
class WindowView:
    """A consistent read of one conversation's hot window."""

    epoch: str
    last_offset: int  # the newest offset given out in the conversation (0: none yet)
    first_offset: int  # the oldest offset the window still holds (last_offset + 1 when empty)
    messages: tuple[Message, ...] = field(default=())  # oldest first

    def covers_after(self, offset: int) -> bool:
        """True when every message after ``offset`` is in the window."""
        return self.first_offset - 1 <= offset <= self.last_offset


@record
class OutboxEntry:
    entry_id: str
    message: Message
