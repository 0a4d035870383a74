"""Rows of the Postgres store read back as the records the server exchanges."""

from __future__ import annotations

from typing import Any

from protocol import Message, format_timestamp

from ..records import Conversation
from .schema import MESSAGE_COLUMNS as SCHEMA_COLUMNS
from .schema import column_list, message_from_row, unanswered_sql

MESSAGE_COLUMNS = column_list()
# Of ``conversations c``, with its members in the order they were given.
CONVERSATION_COLUMNS = (
    "c.id, c.agent_id, c.title, c.owner_id, c.created_at, c.updated_at, "
    "ARRAY(SELECT mm.user_id FROM conversation_members mm "
    "WHERE mm.conversation_id = c.id ORDER BY mm.position) AS members"
)

# The conversations of the ids $1 (a text array).
CONVERSATIONS_BY_ID_SQL = f"SELECT {CONVERSATION_COLUMNS} FROM conversations c WHERE c.id = ANY($1)"
# The message a client id names in a conversation ($1), from a user or none ($2): $3.
BY_CLIENT_MSG_ID_SQL = (
    f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE conversation_id = $1 "
    'AND client_msg_id = $3 AND user_id IS NOT DISTINCT FROM $2 ORDER BY "offset" LIMIT 1'
)
USAGE_ON_SQL = (
    "SELECT COALESCE(SUM(input_tokens + output_tokens), 0) FROM usage "
    "WHERE user_id = $1 AND day = $2"
)

# User messages of the last $1 seconds with no stored answer (at most $2).
UNANSWERED_SQL = unanswered_sql(SCHEMA_COLUMNS, "now() - make_interval(secs => $1)", "$2")


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
