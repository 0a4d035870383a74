"""How the harness speaks to each kind of server: the adapter of the comparison.

Every target is driven with the same frames, those of protocol v1 that a chat load needs:
``hello`` (the server is ready), ``join``/``joined``, ``send``/``ack``, ``message`` (the
fan-out), ``error``; and for the chatserver the reply stream (``gen_start``, ``delta``,
``gen_end``). Dialects differ only in the envelope:

- ``chatserver``: protocol v1 itself at ``/ws``: ``Authorization: Bearer`` on the upgrade, JSON
  text frames or MessagePack binary frames (``chat.v1.json`` / ``chat.v1.msgpack``).
- ``peer``: the bare aiohttp peers of ``bench/peers``: the same JSON frames at ``/ws`` with
  no auth and no REST; conversation ids are any strings the harness picks.
- ``socketio``: the python-socketio peer: Engine.IO v4 over a WebSocket
  (``/socket.io/?EIO=4&transport=websocket``), each frame carried as the Socket.IO event
  ``42["frame",{...}]``; the harness opens the namespace (``40``) and answers pings (``2``).

The hot path never decodes a ``message`` frame: ``message_prefixes`` recognise one by its
first bytes and the harness reads its marker out of the raw payload.
"""

from __future__ import annotations

import json
from typing import Any

import msgpack

from .wsclient import OP_BINARY, OP_TEXT

_json_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
Frame = dict[str, Any]


class Dialect:
    name = "base"
    path = "/ws"
    binary = False
    message_prefixes: tuple[bytes, ...] = (b'{"type":"message"',)

    def headers(self, token: str | None) -> dict[str, str]:
        return {}

    def encode(self, frame: Frame) -> tuple[int, bytes]:
        return OP_TEXT, _json_encoder.encode(frame).encode()

    def decode(self, payload: bytes) -> Frame | str | None:
        """A frame; or a str: a transport packet to answer with (socketio); or None."""
        obj = json.loads(payload)
        return obj if isinstance(obj, dict) else None


class ChatserverDialect(Dialect):
    name = "chatserver"

    def __init__(self, msgpack_encoding: bool = False) -> None:
        self.binary = msgpack_encoding
        if msgpack_encoding:
            # fixmap of 2 keys: "type": "message", then "message" (a fan-out has no ref)
            self.message_prefixes = (b"\x82\xa4type\xa7message",)

    def headers(self, token: str | None) -> dict[str, str]:
        out = {"Sec-WebSocket-Protocol": "chat.v1.msgpack" if self.binary else "chat.v1.json"}
        if token:
            out["Authorization"] = f"Bearer {token}"
        return out

    def encode(self, frame: Frame) -> tuple[int, bytes]:
        if self.binary:
            return OP_BINARY, msgpack.packb(frame, use_bin_type=True)
        return super().encode(frame)

    def decode(self, payload: bytes) -> Frame | str | None:
        if self.binary:
            obj = msgpack.unpackb(payload, raw=False)
            return obj if isinstance(obj, dict) else None
        return super().decode(payload)


class PeerDialect(Dialect):
    name = "peer"


class SocketIODialect(Dialect):
    name = "socketio"
    path = "/socket.io/?EIO=4&transport=websocket"
    message_prefixes = (b'42["frame",{"type":"message"',)

    def encode(self, frame: Frame) -> tuple[int, bytes]:
        return OP_TEXT, b'42["frame",' + _json_encoder.encode(frame).encode() + b"]"

    def decode(self, payload: bytes) -> Frame | str | None:
        if payload[:2] == b"42":
            packet = json.loads(payload[2:])
            if isinstance(packet, list) and len(packet) == 2 and isinstance(packet[1], dict):
                frame: Frame = packet[1]
                return frame
            return None
        if payload == b"2":  # Engine.IO ping: answer pong
            return "3"
        if payload[:1] == b"0":  # Engine.IO open: connect to the default namespace
            return "40"
        return None  # "40{sid}" (namespace connected), noop packets


def dialect(name: str, msgpack_encoding: bool = False) -> Dialect:
    if name == "chatserver":
        return ChatserverDialect(msgpack_encoding)
    if msgpack_encoding:
        raise ValueError(f"the {name} dialect speaks JSON only")
    if name == "peer":
        return PeerDialect()
    if name == "socketio":
        return SocketIODialect()
    raise ValueError(f"unknown dialect {name!r} (chatserver | peer | socketio)")
