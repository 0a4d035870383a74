"""JSON and MessagePack codecs for both directions of the wire.

Decoding turns any malformed input into ``ProtocolError``; nothing else escapes.
"""

from __future__ import annotations

import json
from enum import Enum
from typing import Any

import msgpack
import orjson

from .client_frames import ClientFrame, parse_client_frame
from .codes import ErrorCode
from .errors import ProtocolError
from .limits import Limits
from .server_frames import ServerFrame, parse_server_frame


class Encoding(Enum):
    JSON = "chat.v1.json"
    MSGPACK = "chat.v1.msgpack"

    @property
    def subprotocol(self) -> str:
        return self.value

    @property
    def binary(self) -> bool:
        return self is Encoding.MSGPACK


SUBPROTOCOLS: tuple[str, ...] = tuple(e.value for e in Encoding)


def negotiate(offered: list[str]) -> Encoding | None:
    """The first offered subprotocol we speak; ``None`` when none is acceptable.

    An empty offer means JSON (browsers and simple clients offer nothing).
    """
    if not offered:
        return Encoding.JSON
    for name in offered:
        for enc in Encoding:
            if name.strip() == enc.value:
                return enc
    return None


# What orjson refuses to write (integers past 64 bits, keys that are not strings, lone
# surrogates) the standard encoder spells or refuses as it always did. No check for circular
# references: frames are made of decoded input and the server's own values.
_json_encoder = json.JSONEncoder(
    ensure_ascii=False, separators=(",", ":"), allow_nan=False, check_circular=False
)
# Dataclasses and datetimes, which orjson would write on its own, are refused as before: a
# frame holding one is a bug to hear about, not a format to invent.
_ORJSON_OPTIONS = orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_DATETIME


def encode(obj: dict[str, Any], encoding: Encoding) -> bytes:
    """The payload bytes of one frame: UTF-8 JSON text or a MessagePack map.

    JSON through orjson (a frame in a tenth of the standard encoder's time, the same bytes:
    compact, non-ASCII as UTF-8; a float may be spelled otherwise, ``1e-05`` as
    ``0.00001``); what it refuses goes through the standard encoder, which writes it or
    fails as before. NaN and the infinities, which orjson writes as ``null`` where the
    standard encoder raised, reach no frame: input refuses them (a ping's ``ts`` is
    checked finite) and the server makes none.
    """
    if encoding is Encoding.JSON:
        try:
            return orjson.dumps(obj, option=_ORJSON_OPTIONS)
        except TypeError:
            return _json_encoder.encode(obj).encode()
    data: bytes = msgpack.packb(obj, use_bin_type=True)
    return data


def encode_frame(frame: ClientFrame | ServerFrame, encoding: Encoding) -> bytes:
    return encode(frame.to_dict(), encoding)


def _too_deep(obj: Any, limit: int) -> bool:
    """True when objects and arrays nest deeper than ``limit`` (checked without recursion)."""
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def decode_object(
    data: str | bytes, encoding: Encoding, limits: Limits, *, text: bool | None = None
) -> dict[str, Any]:
    """Decode one payload into a mapping, enforcing the frame size and depth bounds.

    ``text`` says whether it arrived in a WebSocket text frame (default: ``data`` is str);
    a text frame given as bytes is checked to be UTF-8 here.
    """
    if text is None:
        text = isinstance(data, str)
    if text and not isinstance(data, str):
        if len(data) > limits.max_frame_bytes:
            raise ProtocolError(
                ErrorCode.TOO_LARGE, f"frame larger than {limits.max_frame_bytes} bytes"
            )
        try:
            data = bytes(data).decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError(ErrorCode.BAD_FRAME, "text frame is not valid UTF-8") from None
    utf8: bytes | bytearray | memoryview
    if isinstance(data, str):
        try:
            utf8 = data.encode()
        except UnicodeEncodeError:  # a lone surrogate: not a UTF-8 text frame
            raise ProtocolError(ErrorCode.BAD_FRAME, "text frame is not valid UTF-8") from None
    else:
        utf8 = data
    if len(utf8) > limits.max_frame_bytes:
        raise ProtocolError(
            ErrorCode.TOO_LARGE, f"frame larger than {limits.max_frame_bytes} bytes"
        )
    try:
        if encoding is Encoding.JSON:
            if not isinstance(data, str):
                raise ProtocolError(ErrorCode.BAD_FRAME, "binary frame on the JSON subprotocol")
            # orjson refuses what JSON does not allow and Python's decoder takes: NaN and
            # Infinity, and escaped lone surrogates (text no codec can encode again).
            obj = orjson.loads(utf8)
        else:
            if isinstance(data, str):
                raise ProtocolError(
                    ErrorCode.BAD_FRAME, "text frame on the MessagePack subprotocol"
                )
            obj = msgpack.unpackb(data, raw=False, strict_map_key=True, **limits.msgpack_bounds())
    except ProtocolError:
        raise
    except Exception as exc:  # json, msgpack, recursion, unicode: all are malformed input
        kind = "JSON" if encoding is Encoding.JSON else "MessagePack"
        raise ProtocolError(ErrorCode.BAD_FRAME, f"invalid {kind}: {type(exc).__name__}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(ErrorCode.BAD_FRAME, "a frame must be an object")
    # Every level opens with a bracket: a JSON text with no more of them than the limit
    # (strings' own brackets counted too) cannot nest deeper, and needs no walk.
    if (
        not isinstance(data, str) or data.count("{") + data.count("[") > limits.max_depth
    ) and _too_deep(obj, limits.max_depth):
        raise ProtocolError(ErrorCode.BAD_FRAME, f"a frame nests deeper than {limits.max_depth}")
    return obj


def decode_client_frame(
    data: str | bytes, encoding: Encoding, limits: Limits, *, text: bool | None = None
) -> ClientFrame:
    return parse_client_frame(decode_object(data, encoding, limits, text=text), limits)


def decode_server_frame(data: str | bytes, encoding: Encoding, limits: Limits) -> ServerFrame:
    return parse_server_frame(decode_object(data, encoding, limits))
