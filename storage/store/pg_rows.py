"""Rows of the Postgres store read back as the records the server exchanges."""

from __future__ import annotations

from typing import Any

from protocol import Message, format_timestamp

from ..records import Conversation
from .schema import column_list, message_from_row

MESSAGE_COLUMNS = column_list()
# Of ``conversations c``, with its members in the order they were given.
CONVERSATION_COLUMNS = (
    "c.id, c.agent_id, c.title, c.owner_id, c.created_at, c.updated_at, "
    "ARRAY(SELECT mm.user_id FROM conversation_members mm "
    "WHERE mm.conversation_id = c.id ORDER BY mm.position) AS members"
)

# User messages of the last $1 seconds with no stored answer, by conversation and offset
# (at most $2): ``Store.unanswered``.
_Q_COLUMNS = ", ".join(f"q.{c.strip()}" for c in MESSAGE_COLUMNS.split(","))
UNANSWERED_SQL = (
    f"SELECT {_Q_COLUMNS} FROM messages q WHERE q.role = 'user' "
    "AND q.created_at >= now() - make_interval(secs => $1) "
    "AND NOT EXISTS (SELECT 1 FROM messages a WHERE a.conversation_id = "
    "q.conversation_id AND a.reply_to = q.id) "
    'ORDER BY q.conversation_id, q."offset" LIMIT $2'
)


def row_message(row: Any) -> Message:
    raw = row["text_raw"]  # the exact text when Postgres text cannot hold it
    text = bytes(raw).decode("utf-8", "surrogatepass") if raw is not None else row["text"]
    return message_from_row(row, text=text, created_at=format_timestamp(row["created_at"]))


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
