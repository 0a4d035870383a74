"""Typed field readers: each returns the value or raises ProtocolError(bad_frame)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from .codes import ErrorCode
from .errors import ProtocolError
from .text import text_problem

Obj = Mapping[str, Any]


def frame_head(frame: Any) -> dict[str, Any]:
    """The fields every frame starts with: its type, and its ``ref`` when it has one."""
    out: dict[str, Any] = {"type": frame.TYPE}
    if frame.ref is not None:
        out["ref"] = frame.ref
    return out


# What ``str(uuid.UUID(text))`` gives back, in either case: 8-4-4-4-12 hex digits.
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


# The integers MessagePack carries: what a frame read from JSON must fit to be sent again.
_WIRE_MIN, _WIRE_MAX = -(2**63), 2**64 - 1


def _bad(name: str, want: str, ref: str | None) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_FRAME, f"field '{name}' must be {want}", ref)


def req_str(obj: Obj, name: str, max_len: int, ref: str | None = None, *, min_len: int = 1) -> str:
    value = obj.get(name)
    if not isinstance(value, str):
        raise _bad(name, "a string", ref)
    if len(value) < min_len:
        raise _bad(name, "a non-empty string", ref)
    if len(value) > max_len:
        if name == "text":
            raise ProtocolError(
                ErrorCode.TOO_LARGE, f"field 'text' is longer than {max_len} characters", ref
            )
        raise _bad(name, f"at most {max_len} characters", ref)
    problem = text_problem(value, multiline=name == "text")
    if problem is not None:
        raise ProtocolError(ErrorCode.BAD_FRAME, f"field '{name}' holds {problem}", ref)
    return value


def req_uuid(obj: Obj, name: str, ref: str | None = None) -> str:
    """A UUID in its canonical text form (case-insensitive), returned lower-case."""
    value = obj.get(name)
    if not isinstance(value, str) or _UUID.fullmatch(value) is None:
        raise _bad(name, "a UUID", ref)
    return value.lower()


def opt_str(obj: Obj, name: str, max_len: int, ref: str | None = None) -> str | None:
    if obj.get(name) is None:
        return None
    return req_str(obj, name, max_len, ref)


def req_int(
    obj: Obj, name: str, ref: str | None = None, *, lo: int | None = None, hi: int | None = None
) -> int:
    value = obj.get(name)
    if isinstance(value, float) and (value <= _WIRE_MIN or value > _WIRE_MAX):
        # The JSON decoder (orjson) reads an integer past 64 bits as a float (-2^63 - 1
        # rounds to -2^63: an integer that fits is never a float).
        raise _bad(name, "an integer MessagePack can carry", ref)
    # bool is an int subclass; true/false are not numbers on the wire.
    if not isinstance(value, int) or isinstance(value, bool):
        raise _bad(name, "an integer", ref)
    if not _WIRE_MIN <= value <= _WIRE_MAX:  # JSON has no bound; a frame must go both ways
        raise _bad(name, "an integer MessagePack can carry", ref)
    if lo is not None and value < lo:
        raise _bad(name, f"an integer >= {lo}", ref)
    if hi is not None and value > hi:
        raise _bad(name, f"an integer <= {hi}", ref)
    return value


def opt_int(
    obj: Obj, name: str, ref: str | None = None, *, lo: int | None = None, hi: int | None = None
) -> int | None:
    if obj.get(name) is None:
        return None
    return req_int(obj, name, ref, lo=lo, hi=hi)


def req_bool(obj: Obj, name: str, ref: str | None = None) -> bool:
    value = obj.get(name)
    if not isinstance(value, bool):
        raise _bad(name, "a boolean", ref)
    return value


def opt_bool(obj: Obj, name: str, ref: str | None = None) -> bool | None:
    if obj.get(name) is None:
        return None
    return req_bool(obj, name, ref)


def req_obj(obj: Obj, name: str, ref: str | None = None) -> Obj:
    value = obj.get(name)
    if not isinstance(value, Mapping):
        raise _bad(name, "an object", ref)
    return value


def opt_obj(obj: Obj, name: str, ref: str | None = None) -> Obj | None:
    if obj.get(name) is None:
        return None
    return req_obj(obj, name, ref)


def req_list(obj: Obj, name: str, ref: str | None = None) -> list[Any]:
    value = obj.get(name)
    if not isinstance(value, list):
        raise _bad(name, "an array", ref)
    return value


def opt_scalar(
    obj: Obj, name: str, max_len: int, ref: str | None = None
) -> int | float | str | None:
    """A finite number or a short string, echoed back unchanged (ping's ``ts``)."""
    value = obj.get(name)
    if value is None:
        return None
    if isinstance(value, bool):
        raise _bad(name, "a number or a string", ref)
    if isinstance(value, int):
        if abs(value) >= 2**63:
            raise _bad(name, "a 64-bit number", ref)
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _bad(name, "a finite number", ref)
        if abs(value) >= 2**63:
            # An integer past 64 bits reaches here as a float (orjson reads it so); echoed,
            # it would come back changed. No other float this large is a timestamp either.
            raise _bad(name, "a 64-bit number", ref)
        return value
    if isinstance(value, str) and len(value) <= max_len:
        return value
    raise _bad(name, "a number or a short string", ref)


def req_enum(obj: Obj, name: str, allowed: frozenset[str], ref: str | None = None) -> str:
    value = obj.get(name)
    if not isinstance(value, str) or value not in allowed:
        raise _bad(name, "one of " + ", ".join(sorted(allowed)), ref)
    return value


def opt_enum(obj: Obj, name: str, allowed: frozenset[str], ref: str | None = None) -> str | None:
    if obj.get(name) is None:
        return None
    return req_enum(obj, name, allowed, ref)
