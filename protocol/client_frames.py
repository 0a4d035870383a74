"""Frames a client sends: typed, validated from a decoded object, encodable back."""

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
    req_int,
    req_str,
    req_uuid,
)
from .limits import Limits
from .record import record


@record
class Since:
    offset: int
    epoch: str

    def to_dict(self) -> dict[str, Any]:
        return {"offset": self.offset, "epoch": self.epoch}


@record
class Auth:
    TYPE: ClassVar[str] = "auth"
    token: str
    ref: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**frame_head(self), "token": self.token}

    @classmethod
    def parse(cls, obj: Obj, limits: Limits, ref: str | None) -> Auth:
        return cls(req_str(obj, "token", limits.max_token_chars, ref), ref)


@record
class Join:
    TYPE: ClassVar[str] = "join"
    conversation_id: str
    since: Since | None = None
    ref: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {**frame_head(self), "conversation_id": self.conversation_id}
        if self.since is not None:
            out["since"] = self.since.to_dict()
        return out

    @classmethod
    def parse(cls, obj: Obj, limits: Limits, ref: str | None) -> Join:
        conversation_id = req_uuid(obj, "conversation_id", ref)
        since_obj = opt_obj(obj, "since", ref)
        since = None
        if since_obj is not None:
            since = Since(
                req_int(since_obj, "offset", ref, lo=0, hi=2**62),
                req_str(since_obj, "epoch", limits.max_id_chars, ref),
            )
        return cls(conversation_id, since, ref)


@record
class Leave:
    TYPE: ClassVar[str] = "leave"
    conversation_id: str
    ref: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**frame_head(self), "conversation_id": self.conversation_id}

    @classmethod
    def parse(cls, obj: Obj, limits: Limits, ref: str | None) -> Leave:
        return cls(req_uuid(obj, "conversation_id", ref), ref)


@record
class Send:
    TYPE: ClassVar[str] = "send"
    conversation_id: str
    client_msg_id: str
    text: str
    ref: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            **frame_head(self),
            "conversation_id": self.conversation_id,
            "client_msg_id": self.client_msg_id,
            "text": self.text,
        }

    @classmethod
    def parse(cls, obj: Obj, limits: Limits, ref: str | None) -> Send:
        return cls(
            req_uuid(obj, "conversation_id", ref),
            req_str(obj, "client_msg_id", limits.max_client_msg_id_chars, ref),
            req_str(obj, "text", limits.max_text_chars, ref),
            ref,
        )


@record
class Cancel:
    TYPE: ClassVar[str] = "cancel"
    generation_id: str
    ref: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**frame_head(self), "generation_id": self.generation_id}

    @classmethod
    def parse(cls, obj: Obj, limits: Limits, ref: str | None) -> Cancel:
        return cls(req_uuid(obj, "generation_id", ref), ref)


@record
class Typing:
    TYPE: ClassVar[str] = "typing"
    conversation_id: str
    ref: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**frame_head(self), "conversation_id": self.conversation_id}

    @classmethod
    def parse(cls, obj: Obj, limits: Limits, ref: str | None) -> Typing:
        return cls(req_uuid(obj, "conversation_id", ref), ref)


@record
class History:
    TYPE: ClassVar[str] = "history"
    conversation_id: str
    before: int | None = None
    limit: int | None = None
    ref: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {**frame_head(self), "conversation_id": self.conversation_id}
        if self.before is not None:
            out["before"] = self.before
        if self.limit is not None:
            out["limit"] = self.limit
        return out

    @classmethod
    def parse(cls, obj: Obj, limits: Limits, ref: str | None) -> History:
        return cls(
            req_uuid(obj, "conversation_id", ref),
            opt_int(obj, "before", ref, lo=1, hi=2**62),
            opt_int(obj, "limit", ref, lo=1, hi=limits.history_max_limit),
            ref,
        )

    def effective_limit(self, limits: Limits) -> int:
        return self.limit if self.limit is not None else limits.history_default_limit


@record
class Ping:
    TYPE: ClassVar[str] = "ping"
    ts: int | float | str | None = None
    ref: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = frame_head(self)
        if self.ts is not None:
            out["ts"] = self.ts
        return out

    @classmethod
    def parse(cls, obj: Obj, limits: Limits, ref: str | None) -> Ping:
        return cls(opt_scalar(obj, "ts", limits.max_id_chars, ref), ref)


ClientFrame = Auth | Join | Leave | Send | Cancel | Typing | History | Ping

_PARSERS: dict[str, Callable[[Obj, Limits, str | None], ClientFrame]] = {
    cls.TYPE: cls.parse for cls in (Auth, Join, Leave, Send, Cancel, Typing, History, Ping)
}
CLIENT_TYPES = frozenset(_PARSERS)


def read_ref(obj: Obj, limits: Limits) -> str | None:
    """The frame's ``ref`` if it is a valid one; an invalid ref is a bad frame without a ref."""
    return opt_str(obj, "ref", limits.max_ref_chars)


def parse_client_frame(obj: Obj, limits: Limits) -> ClientFrame:
    ref = read_ref(obj, limits)
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise ProtocolError(ErrorCode.BAD_FRAME, "frame has no string field 'type'", ref)
    parser = _PARSERS.get(kind)
    if parser is None:
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown frame type {kind[:64]!r}", ref)
    return parser(obj, limits, ref)
