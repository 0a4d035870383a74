"""Server frames of a conversation's live stream: messages, replies token by token, typing,
presence.

These are the frames fanned out to every member; the direct replies live in server_frames.
"""

from __future__ import annotations

from typing import Any, ClassVar

from .fields import (
    Obj,
    frame_head,
    opt_bool,
    opt_int,
    opt_obj,
    opt_str,
    req_enum,
    req_int,
    req_list,
    req_obj,
    req_str,
)
from .message import FINISH_REASONS, Message, Usage
from .record import record

_ID = 64
_TEXT = 1 << 30
# gen_end.error_code: not an enum on decode, so that a client keeps parsing gen_end when the
# server learns a new code (docs/protocol.md: treat an unknown one as a plain error).
_CODE = 64


@record
class MessageEvent:
    TYPE: ClassVar[str] = "message"
    message: Message
    ref: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**frame_head(self), "message": self.message.to_dict()}

    @classmethod
    def parse(cls, obj: Obj) -> MessageEvent:
        return cls(Message.from_dict(req_obj(obj, "message")), opt_str(obj, "ref", _ID))


@record
class GenStart:
    TYPE: ClassVar[str] = "gen_start"
    conversation_id: str
    generation_id: str
    reply_to: str
    agent_id: str
    model: str
    ref: str | None = None
    # The model may think before its first delta (no text for a while): sent only when true.
    thinking: bool = False

    def to_dict(self) -> dict[str, Any]:
        out = {
            **frame_head(self),
            "conversation_id": self.conversation_id,
            "generation_id": self.generation_id,
            "reply_to": self.reply_to,
            "agent_id": self.agent_id,
            "model": self.model,
        }
        if self.thinking:
            out["thinking"] = True
        return out

    @classmethod
    def parse(cls, obj: Obj) -> GenStart:
        return cls(
            req_str(obj, "conversation_id", _ID),
            req_str(obj, "generation_id", _ID),
            req_str(obj, "reply_to", _ID),
            req_str(obj, "agent_id", _ID),
            req_str(obj, "model", 128),
            opt_str(obj, "ref", _ID),
            bool(opt_bool(obj, "thinking")),
        )


@record
class Delta:
    TYPE: ClassVar[str] = "delta"
    conversation_id: str
    generation_id: str
    seq: int
    text: str
    ref: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            **frame_head(self),
            "conversation_id": self.conversation_id,
            "generation_id": self.generation_id,
            "seq": self.seq,
            "text": self.text,
        }

    @classmethod
    def parse(cls, obj: Obj) -> Delta:
        return cls(
            req_str(obj, "conversation_id", _ID),
            req_str(obj, "generation_id", _ID),
            req_int(obj, "seq", lo=1),
            req_str(obj, "text", _TEXT, min_len=0),
            opt_str(obj, "ref", _ID),
        )


@record
class GenEnd:
    TYPE: ClassVar[str] = "gen_end"
    conversation_id: str
    generation_id: str
    finish_reason: str
    usage: Usage
    message: Message | None
    error: str | None = None
    ref: str | None = None
    error_code: str | None = None  # with ``error``: what kind of failure (``model_…``)
    retry_after_ms: int | None = None  # with ``error_code``: when asking again may succeed
    thinking_tokens: int | None = None  # of ``usage.output_tokens``, spent thinking

    def to_dict(self) -> dict[str, Any]:
        out = {
            **frame_head(self),
            "conversation_id": self.conversation_id,
            "generation_id": self.generation_id,
            "finish_reason": self.finish_reason,
            "usage": self.usage.to_dict(),
            "message": self.message.to_dict() if self.message is not None else None,
        }
        if self.error is not None:
            out["error"] = self.error
        if self.error_code is not None:
            out["error_code"] = self.error_code
        if self.retry_after_ms is not None:
            out["retry_after_ms"] = self.retry_after_ms
        if self.thinking_tokens is not None:
            out["thinking_tokens"] = self.thinking_tokens
        return out

    @classmethod
    def parse(cls, obj: Obj) -> GenEnd:
        message = opt_obj(obj, "message")
        return cls(
            req_str(obj, "conversation_id", _ID),
            req_str(obj, "generation_id", _ID),
            req_enum(obj, "finish_reason", FINISH_REASONS),
            Usage.from_dict(req_obj(obj, "usage")),
            Message.from_dict(message) if message is not None else None,
            opt_str(obj, "error", 1024),
            opt_str(obj, "ref", _ID),
            opt_str(obj, "error_code", _CODE),
            opt_int(obj, "retry_after_ms", lo=0),
            opt_int(obj, "thinking_tokens", lo=0),
        )


@record
class TypingNotice:
    TYPE: ClassVar[str] = "typing"
    conversation_id: str
    user_id: str
    ref: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            **frame_head(self),
            "conversation_id": self.conversation_id,
            "user_id": self.user_id,
        }

    @classmethod
    def parse(cls, obj: Obj) -> TypingNotice:
        return cls(
            req_str(obj, "conversation_id", _ID),
            req_str(obj, "user_id", _ID),
            opt_str(obj, "ref", _ID),
        )


@record
class Presence:
    """Who of a conversation's members is online (has a connection joined to it, on any
    instance): the whole list, sorted, so a client replaces what it had."""

    TYPE: ClassVar[str] = "presence"
    conversation_id: str
    online: tuple[str, ...]
    ref: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            **frame_head(self),
            "conversation_id": self.conversation_id,
            "online": list(self.online),
        }

    @classmethod
    def parse(cls, obj: Obj) -> Presence:
        online = req_list(obj, "online")
        users = tuple(req_str({"online": user}, "online", _ID) for user in online)
        return cls(req_str(obj, "conversation_id", _ID), users, opt_str(obj, "ref", _ID))
