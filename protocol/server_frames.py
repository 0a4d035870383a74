"""Frames the server sends: typed, encodable, and decodable for clients and tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from .codes import ErrorCode
from .errors import ProtocolError
from .fields import (
    Obj,
    frame_head,
    opt_int,
    opt_obj,
    opt_scalar,
    opt_str,
    req_bool,
    req_enum,
    req_int,
    req_list,
    req_str,
)
from .message import Message
from .record import record
from .stream_frames import Delta, GenEnd, GenStart, MessageEvent, Presence, TypingNotice

ERROR_CODES = frozenset(c.value for c in ErrorCode)
_ID = 64
_TEXT = 1 << 30


def _messages(obj: Obj, name: str) -> tuple[Message, ...]:
    items = req_list(obj, name)
    out = []
    for item in items:
        if not isinstance(item, dict):
            raise ProtocolError(ErrorCode.BAD_FRAME, f"'{name}' must hold message objects")
        out.append(Message.from_dict(item))
    return tuple(out)


@record
class Hello:
    TYPE: ClassVar[str] = "hello"
    session_id: str
    user_id: str
    server_id: str
    heartbeat_s: int
    max_frame_bytes: int
    protocol: int = 1
    ref: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            **frame_head(self),
            "session_id": self.session_id,
            "user_id": self.user_id,
            "server_id": self.server_id,
            "heartbeat_s": self.heartbeat_s,
            "max_frame_bytes": self.max_frame_bytes,
            "protocol": self.protocol,
        }

    @classmethod
    def parse(cls, obj: Obj) -> Hello:
        return cls(
            req_str(obj, "session_id", _ID),
            req_str(obj, "user_id", _ID),
            req_str(obj, "server_id", _ID),
            req_int(obj, "heartbeat_s", lo=0),
            req_int(obj, "max_frame_bytes", lo=1),
            req_int(obj, "protocol", lo=1),
            opt_str(obj, "ref", _ID),
        )


@record
class GenerationSnapshot:
    generation_id: str
    seq: int
    text: str

    def to_dict(self) -> dict[str, Any]:
        return {"generation_id": self.generation_id, "seq": self.seq, "text": self.text}


@record
class Joined:
    TYPE: ClassVar[str] = "joined"
    conversation_id: str
    epoch: str
    offset: int
    recovered: bool
    messages: tuple[Message, ...] = ()
    generation: GenerationSnapshot | None = None
    ref: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {
            **frame_head(self),
            "conversation_id": self.conversation_id,
            "epoch": self.epoch,
            "offset": self.offset,
            "recovered": self.recovered,
            "messages": [m.to_dict() for m in self.messages],
        }
        if self.generation is not None:
            out["generation"] = self.generation.to_dict()
        return out

    @classmethod
    def parse(cls, obj: Obj) -> Joined:
        gen = opt_obj(obj, "generation")
        return cls(
            req_str(obj, "conversation_id", _ID),
            req_str(obj, "epoch", _ID),
            req_int(obj, "offset", lo=0),
            req_bool(obj, "recovered"),
            _messages(obj, "messages"),
            GenerationSnapshot(
                req_str(gen, "generation_id", _ID),
                req_int(gen, "seq", lo=0),
                req_str(gen, "text", _TEXT, min_len=0),
            )
            if gen is not None
            else None,
            opt_str(obj, "ref", _ID),
        )


@record
class Left:
    TYPE: ClassVar[str] = "left"
    conversation_id: str
    ref: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**frame_head(self), "conversation_id": self.conversation_id}

    @classmethod
    def parse(cls, obj: Obj) -> Left:
        return cls(req_str(obj, "conversation_id", _ID), opt_str(obj, "ref", _ID))


@record
class Ack:
    TYPE: ClassVar[str] = "ack"
    client_msg_id: str
    message_id: str
    offset: int
    created_at: str
    duplicate: bool
    ref: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            **frame_head(self),
            "client_msg_id": self.client_msg_id,
            "message_id": self.message_id,
            "offset": self.offset,
            "created_at": self.created_at,
            "duplicate": self.duplicate,
        }

    @classmethod
    def parse(cls, obj: Obj) -> Ack:
        return cls(
            req_str(obj, "client_msg_id", _ID),
            req_str(obj, "message_id", _ID),
            req_int(obj, "offset", lo=1),
            req_str(obj, "created_at", _ID),
            req_bool(obj, "duplicate"),
            opt_str(obj, "ref", _ID),
        )


@record
class HistoryPage:
    TYPE: ClassVar[str] = "history"
    conversation_id: str
    messages: tuple[Message, ...]
    has_more: bool
    ref: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            **frame_head(self),
            "conversation_id": self.conversation_id,
            "messages": [m.to_dict() for m in self.messages],
            "has_more": self.has_more,
        }

    @classmethod
    def parse(cls, obj: Obj) -> HistoryPage:
        return cls(
            req_str(obj, "conversation_id", _ID),
            _messages(obj, "messages"),
            req_bool(obj, "has_more"),
            opt_str(obj, "ref", _ID),
        )


@record
class Pong:
    TYPE: ClassVar[str] = "pong"
    ts: int | float | str | None = None
    ref: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**frame_head(self), "ts": self.ts}

    @classmethod
    def parse(cls, obj: Obj) -> Pong:
        return cls(opt_scalar(obj, "ts", _ID), opt_str(obj, "ref", _ID))


@record
class Reconnect:
    TYPE: ClassVar[str] = "reconnect"
    reason: str
    after_ms: int
    ref: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**frame_head(self), "reason": self.reason, "after_ms": self.after_ms}

    @classmethod
    def parse(cls, obj: Obj) -> Reconnect:
        return cls(
            req_str(obj, "reason", 256), req_int(obj, "after_ms", lo=0), opt_str(obj, "ref", _ID)
        )


@record
class ErrorFrame:
    TYPE: ClassVar[str] = "error"
    code: str
    message: str
    retry_after_ms: int | None = None
    ref: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {**frame_head(self), "code": self.code, "message": self.message}
        if self.retry_after_ms is not None:
            out["retry_after_ms"] = self.retry_after_ms
        return out

    @classmethod
    def parse(cls, obj: Obj) -> ErrorFrame:
        return cls(
            req_enum(obj, "code", ERROR_CODES),
            req_str(obj, "message", 4096, min_len=0),
            opt_int(obj, "retry_after_ms", lo=0),
            opt_str(obj, "ref", _ID),
        )


ServerFrame = (
    Hello
    | Joined
    | Left
    | Ack
    | MessageEvent
    | GenStart
    | Delta
    | GenEnd
    | TypingNotice
    | Presence
    | HistoryPage
    | Pong
    | Reconnect
    | ErrorFrame
)

_PARSERS: dict[str, Callable[[Obj], ServerFrame]] = {
    cls.TYPE: cls.parse
    for cls in (
        Hello,
        Joined,
        Left,
        Ack,
        MessageEvent,
        GenStart,
        Delta,
        GenEnd,
        TypingNotice,
        Presence,
        HistoryPage,
        Pong,
        Reconnect,
        ErrorFrame,
    )
}
SERVER_TYPES = frozenset(_PARSERS)


def parse_server_frame(obj: Obj) -> ServerFrame:
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise ProtocolError(ErrorCode.BAD_FRAME, "frame has no string field 'type'")
    parser = _PARSERS.get(kind)
    if parser is None:
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown frame type {kind[:64]!r}")
    return parser(obj)
