"""Rows of the Postgres store read back as the records the server exchanges."""

from __future__ import annotations

from typing import Any

from protocol import Message, Usage, format_timestamp

from ..records import Conversation

MESSAGE_COLUMNS = (
    'id, conversation_id, "offset", role, text, text_raw, created_at, user_id, agent_id, '
    "client_msg_id, finish_reason, input_tokens, output_tokens, model, reply_to"
)
# Of ``conversations c``, with its members in the order they were given.
CONVERSATION_COLUMNS = (
    "c.id, c.agent_id, c.title, c.owner_id, c.created_at, c.updated_at, "
    "ARRAY(SELECT mm.user_id FROM conversation_members mm "
    "WHERE mm.conversation_id = c.id ORDER BY mm.position) AS members"
)


def row_message(row: Any) -> Message:
    raw = row["text_raw"]  # the exact text when Postgres text cannot hold it
    text = bytes(raw).decode("utf-8", "surrogatepass") if raw is not None else row["text"]
    inp, out = row["input_tokens"], row["output_tokens"]
    return Message(
        id=row["id"],
        conversation_id=row["conversation_id"],
        offset=int(row["offset"]),
        role=row["role"],
        text=text,
        created_at=format_timestamp(row["created_at"]),
        user_id=row["user_id"],
        agent_id=row["agent_id"],
        client_msg_id=row["client_msg_id"],
        finish_reason=row["finish_reason"],
        usage=Usage(int(inp), int(out)) if inp is not None else None,
        model=row["model"],
        reply_to=row["reply_to"],
    )


def row_conversation(row: Any) -> Conversation:
    return Conversation(
        id=row["id"],
        agent_id=row["agent_id"],
        title=row["title"],
        owner_id=row["owner_id"],
        members=tuple(row["members"]),
        created_at=format_timestamp(row["created_at"]),
        updated_at=format_timestamp(row["updated_at"]),
    )
