"""The message object shared by frames, the hot window, the outbox and the store."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from .codes import FinishReason, Role
from .fields import Obj, opt_enum, opt_obj, opt_str, req_enum, req_int, req_str
from .record import record

ROLES = frozenset(r.value for r in Role)
FINISH_REASONS = frozenset(r.value for r in FinishReason)
_LONG = 1 << 30  # stored texts are checked on input; this only guards decoding


@record
class Usage:
    input_tokens: int
    output_tokens: int

    def to_dict(self) -> dict[str, Any]:
        return {"input_tokens": self.input_tokens, "output_tokens": self.output_tokens}

    @classmethod
    def from_dict(cls, obj: Obj) -> Usage:
        return cls(req_int(obj, "input_tokens", lo=0), req_int(obj, "output_tokens", lo=0))


@record
class Message:
    id: str
    conversation_id: str
    offset: int
    role: str
    text: str
    created_at: str
    user_id: str | None = None
    agent_id: str | None = None
    client_msg_id: str | None = None
    finish_reason: str | None = None
    usage: Usage | None = None
    model: str | None = None
    reply_to: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "conversation_id": self.conversation_id,
            "offset": self.offset,
            "role": self.role,
            "text": self.text,
            "created_at": self.created_at,
        }
        out.update(optional_message_fields(self))
        if self.usage is not None:
            out["usage"] = self.usage.to_dict()
        return out

    def well_typed(self) -> bool:
        """Every field of the type and set it must have: what a message built without
        ``from_dict`` (from a payload this system wrote) is checked for before it is kept.
        Lengths and characters are not: they were checked when the message came in."""
        return (
            type(self.id) is str
            and type(self.conversation_id) is str
            and type(self.offset) is int
            and self.offset >= 1
            and self.role in ROLES
            and type(self.text) is str
            and type(self.created_at) is str
            and all(
                value is None or type(value) is str
                for value in (
                    self.user_id,
                    self.agent_id,
                    self.client_msg_id,
                    self.model,
                    self.reply_to,
                )
            )
            and (self.finish_reason is None or self.finish_reason in FINISH_REASONS)
            and (
                self.usage is None
                or (
                    type(self.usage.input_tokens) is int
                    and type(self.usage.output_tokens) is int
                    and self.usage.input_tokens >= 0
                    and self.usage.output_tokens >= 0
                )
            )
        )

    @classmethod
    def from_dict(cls, obj: Obj) -> Message:
        usage = opt_obj(obj, "usage")
        return cls(
            id=req_str(obj, "id", 64),
            conversation_id=req_str(obj, "conversation_id", 64),
            offset=req_int(obj, "offset", lo=1),
            role=req_enum(obj, "role", ROLES),
            text=req_str(obj, "text", _LONG, min_len=0),
            created_at=req_str(obj, "created_at", 64),
            user_id=opt_str(obj, "user_id", 64),
            agent_id=opt_str(obj, "agent_id", 64),
            client_msg_id=opt_str(obj, "client_msg_id", 64),
            finish_reason=opt_enum(obj, "finish_reason", FINISH_REASONS),
            usage=Usage.from_dict(usage) if usage is not None else None,
            model=opt_str(obj, "model", 128),
            reply_to=opt_str(obj, "reply_to", 64),
        )


_OPTIONAL = ("user_id", "agent_id", "client_msg_id", "finish_reason", "model", "reply_to")


def optional_message_fields(source: Any) -> dict[str, Any]:
    """The optional string fields of a message (or a draft of one) that are set."""
    out: dict[str, Any] = {}
    for name in _OPTIONAL:
        value = getattr(source, name)
        if value is not None:
            out[name] = value
    return out


def format_timestamp(moment: datetime) -> str:
    """RFC 3339, UTC, millisecond precision: ``2026-11-27T20:13:30.123Z``."""
    # isoformat is C all the way (strftime took ~3x as long); it truncates to milliseconds
    # as the old format did, and ends "+00:00" for UTC.
    return moment.astimezone(UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


def parse_timestamp(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def timestamp_from_ms(epoch_ms: int) -> str:
    return format_timestamp(datetime.fromtimestamp(epoch_ms / 1000, UTC))


def timestamp_to_ms(text: str) -> int:
    return int(parse_timestamp(text).timestamp() * 1000)
