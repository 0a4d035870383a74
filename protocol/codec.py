"""JSON and MessagePack codecs for both directions of the wire.

Decoding turns any malformed input into ``ProtocolError``; nothing else escapes.
"""

from __future__ import annotations

import json
import re
from enum import Enum
from typing import Any

import msgpack

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


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


# No check for circular references (a fifth of the encoder's time on a message frame):
# frames are made of decoded input and the server's own values, which cannot hold a cycle.
_json_encoder = json.JSONEncoder(
    ensure_ascii=False, separators=(",", ":"), allow_nan=False, check_circular=False
)
# One decoder for every frame: ``json.loads`` with an argument builds a new one per call.
_json_decoder = json.JSONDecoder(parse_constant=_reject_constant)
# A ``\uD800``-``\uDFFF`` escape: JSON can spell a lone surrogate, which is no Unicode text.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abcdefABCDEF]")


def encode(obj: dict[str, Any], encoding: Encoding) -> bytes:
    """The payload bytes of one frame: UTF-8 JSON text or a MessagePack map."""
    if encoding is Encoding.JSON:
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
    if isinstance(data, str):
        try:
            size = len(data.encode())
        except UnicodeEncodeError:  # a lone surrogate: not a UTF-8 text frame
            raise ProtocolError(ErrorCode.BAD_FRAME, "text frame is not valid UTF-8") from None
    else:
        size = len(data)
    if size > limits.max_frame_bytes:
        raise ProtocolError(
            ErrorCode.TOO_LARGE, f"frame larger than {limits.max_frame_bytes} bytes"
        )
    try:
        if encoding is Encoding.JSON:
            if isinstance(data, bytes | bytearray):
                raise ProtocolError(ErrorCode.BAD_FRAME, "binary frame on the JSON subprotocol")
            obj = _json_decoder.decode(data)
            if _SURROGATE_ESCAPE.search(data):
                # Escaped lone surrogates decode to str that no codec can encode again.
                _json_encoder.encode(obj).encode()
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
