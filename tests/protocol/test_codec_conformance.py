"""Conformance of both encodings to the wire protocol (docs/protocol.md): one suite, run once per encoding."""

from __future__ import annotations

import json
from typing import Any

import msgpack
import pytest

from protocol import (
    CLIENT_TYPES,
    DEFAULT_LIMITS,
    SERVER_TYPES,
    SUBPROTOCOLS,
    Ack,
    Auth,
    Cancel,
    ClientFrame,
    Delta,
    Encoding,
    ErrorCode,
    ErrorFrame,
    GenEnd,
    GenerationSnapshot,
    GenStart,
    Hello,
    History,
    HistoryPage,
    Join,
    Joined,
    Leave,
    Left,
    Limits,
    Message,
    MessageEvent,
    Ping,
    Pong,
    Presence,
    ProtocolError,
    Reconnect,
    Send,
    ServerFrame,
    Since,
    Typing,
    TypingNotice,
    Usage,
    decode_client_frame,
    decode_object,
    decode_server_frame,
    encode,
    encode_frame,
    negotiate,
    text_problem,
)

ENCODINGS = [Encoding.JSON, Encoding.MSGPACK]
CONV = "6f1c1b0e-3f3a-4a58-9d59-0d1f1f7b8a01"
GEN = "0b6a1c50-94b7-4b59-a5bb-71f5d1f2c4aa"
MSG = "a3f0c8de-61b2-4d0e-8bbd-7f6a1f5b2c11"
TS = "2026-11-27T20:13:30.123Z"

USER_MSG = Message(
    id=MSG,
    conversation_id=CONV,
    offset=1,
    role="user",
    text="Bonjour, ça va ? 👋",
    created_at=TS,
    user_id="alice",
    client_msg_id="c-1",
)
AGENT_MSG = Message(
    id="f7d4f1e2-8b1c-4d4e-9c7a-2e3b4c5d6e7f",
    conversation_id=CONV,
    offset=2,
    role="assistant",
    text="",
    created_at=TS,
    agent_id="echo",
    finish_reason="stop",
    usage=Usage(input_tokens=12, output_tokens=0),
    model="echo-1",
    reply_to=MSG,
)
SYSTEM_MSG = Message(
    id="0f0e0d0c-0b0a-4909-8807-060504030201",
    conversation_id=CONV,
    offset=3,
    role="system",
    text="Alice joined",
    created_at=TS,
)

CLIENT_FRAMES: list[ClientFrame] = [
    Auth(token="eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.sig"),
    Auth(token="t", ref="r-auth"),
    Join(conversation_id=CONV),
    Join(conversation_id=CONV, since=Since(offset=0, epoch="e1"), ref="r-join"),
    Join(conversation_id=CONV, since=Since(offset=41, epoch="epoch-2")),
    Leave(conversation_id=CONV, ref="r"),
    Send(conversation_id=CONV, client_msg_id="c" * 64, text="hello 世界"),
    Send(conversation_id=CONV, client_msg_id="c-2", text="x" * 8000, ref="r" * 64),
    Cancel(generation_id=GEN),
    Typing(conversation_id=CONV),
    History(conversation_id=CONV),
    History(conversation_id=CONV, before=17, limit=1, ref="h"),
    History(conversation_id=CONV, limit=100),
    Ping(),
    Ping(ts=1732738410123, ref="p"),
    Ping(ts=-(2**63) + 1),
    Ping(ts=1.5),
    Ping(ts="opaque-token"),
    Ping(ts=""),
]

SERVER_FRAMES: list[ServerFrame] = [
    Hello(
        session_id="s-1",
        user_id="alice",
        server_id="node-a",
        heartbeat_s=25,
        max_frame_bytes=65536,
    ),
    Hello("s-2", "bob", "node-b", 0, 1, protocol=1, ref="r-auth"),
    Joined(conversation_id=CONV, epoch="e1", offset=0, recovered=False),
    Joined(
        conversation_id=CONV,
        epoch="e1",
        offset=3,
        recovered=True,
        messages=(USER_MSG, AGENT_MSG, SYSTEM_MSG),
        generation=GenerationSnapshot(generation_id=GEN, seq=4, text="partial ans"),
        ref="r-join",
    ),
    Joined(CONV, "e2", 9, False, (), GenerationSnapshot(GEN, 0, "")),
    Left(conversation_id=CONV, ref="r"),
    Ack(client_msg_id="c-1", message_id=MSG, offset=1, created_at=TS, duplicate=False),
    Ack("c-1", MSG, 1, TS, True, ref="r"),
    MessageEvent(message=USER_MSG),
    MessageEvent(message=AGENT_MSG),
    GenStart(
        conversation_id=CONV, generation_id=GEN, reply_to=MSG, agent_id="echo", model="echo-1"
    ),
    GenStart(CONV, GEN, MSG, "finance", "models/gemini-2.5-pro", thinking=True),
    Delta(conversation_id=CONV, generation_id=GEN, seq=1, text="Hel"),
    Delta(CONV, GEN, 2, ""),
    GenEnd(CONV, GEN, "stop", Usage(12, 34), AGENT_MSG),
    GenEnd(CONV, GEN, "cancelled", Usage(0, 0), None),
    GenEnd(CONV, GEN, "error", Usage(1, 2), AGENT_MSG, error="upstream timed out"),
    GenEnd(CONV, GEN, "length", Usage(1, 2), AGENT_MSG),
    GenEnd(CONV, GEN, "safety", Usage(1, 2), AGENT_MSG),
    GenEnd(CONV, GEN, "stop", Usage(9, 700), AGENT_MSG, thinking_tokens=650),
    GenEnd(
        CONV,
        GEN,
        "error",
        Usage(0, 0),
        AGENT_MSG,
        error="model rate limited",
        error_code="model_rate_limited",
        retry_after_ms=37_000,
    ),
    GenEnd(CONV, GEN, "error", Usage(0, 0), None, "down", error_code="a_code_from_later"),
    TypingNotice(conversation_id=CONV, user_id="bob"),
    Presence(conversation_id=CONV, online=("alice", "bob")),
    Presence(CONV, ()),
    HistoryPage(conversation_id=CONV, messages=(USER_MSG, AGENT_MSG), has_more=True, ref="h"),
    HistoryPage(CONV, (), False),
    Pong(),
    Pong(ts=1732738410123, ref="p"),
    Pong(ts=0.25),
    Pong(ts="opaque-token"),
    Reconnect(reason="draining", after_ms=250),
    ErrorFrame(code="bad_frame", message="field 'text' must be a string", ref="r"),
    ErrorFrame(code="rate_limited", message="slow down", retry_after_ms=1200),
    *[ErrorFrame(code=code.value, message="") for code in ErrorCode],
]


def wire(obj: Any, encoding: Encoding) -> str | bytes:
    """What the transport hands over: a str for a JSON text frame, bytes for msgpack."""
    data = encode(obj, encoding)
    return data.decode() if encoding is Encoding.JSON else data


def wire_frame(frame: ClientFrame | ServerFrame, encoding: Encoding) -> str | bytes:
    data = encode_frame(frame, encoding)
    return data.decode() if encoding is Encoding.JSON else data


def client_error(
    data: str | bytes, encoding: Encoding, limits: Limits = DEFAULT_LIMITS
) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        decode_client_frame(data, encoding, limits)
    return info.value


def client_obj_error(
    obj: Any, encoding: Encoding, limits: Limits = DEFAULT_LIMITS
) -> ProtocolError:
    return client_error(wire(obj, encoding), encoding, limits)


@pytest.fixture(params=ENCODINGS, ids=lambda e: e.name.lower())
def enc(request: pytest.FixtureRequest) -> Encoding:
    encoding: Encoding = request.param
    return encoding


# --------------------------------------------------------------------------------------------
# round trips


def test_samples_cover_every_frame_type_of_the_protocol() -> None:
    assert {f.TYPE for f in CLIENT_FRAMES} == CLIENT_TYPES
    assert {f.TYPE for f in SERVER_FRAMES} == SERVER_TYPES
    documented_client = {"auth", "join", "leave", "send", "cancel", "typing", "history", "ping"}
    documented_server = {
        "hello", "joined", "left", "ack", "message", "gen_start", "delta", "gen_end",
        "typing", "history", "pong", "reconnect", "error", "presence",
    }  # fmt: skip
    assert documented_client == CLIENT_TYPES
    assert documented_server == SERVER_TYPES


@pytest.mark.parametrize("frame", CLIENT_FRAMES, ids=lambda f: f.TYPE)
def test_client_frame_round_trip(frame: ClientFrame, enc: Encoding) -> None:
    data = wire_frame(frame, enc)
    assert isinstance(data, bytes if enc.binary else str)
    decoded = decode_client_frame(data, enc, DEFAULT_LIMITS)
    assert decoded == frame
    assert type(decoded) is type(frame)
    assert encode_frame(decoded, enc) == encode_frame(frame, enc)


@pytest.mark.parametrize("frame", SERVER_FRAMES, ids=lambda f: f.TYPE)
def test_server_frame_round_trip(frame: ServerFrame, enc: Encoding) -> None:
    data = wire_frame(frame, enc)
    decoded = decode_server_frame(data, enc, DEFAULT_LIMITS)
    assert decoded == frame
    assert type(decoded) is type(frame)
    assert encode_frame(decoded, enc) == encode_frame(frame, enc)


@pytest.mark.parametrize("frame", [*CLIENT_FRAMES, *SERVER_FRAMES], ids=lambda f: f.TYPE)
def test_both_encodings_carry_the_same_object(frame: ClientFrame | ServerFrame) -> None:
    as_json = json.loads(encode_frame(frame, Encoding.JSON))
    as_msgpack = msgpack.unpackb(encode_frame(frame, Encoding.MSGPACK), raw=False)
    assert as_json == as_msgpack == frame.to_dict()
    assert as_json["type"] == frame.TYPE


def test_json_is_compact_utf8_text() -> None:
    data = encode({"type": "delta", "text": "é 世界"}, Encoding.JSON)
    assert data == '{"type":"delta","text":"é 世界"}'.encode()


def test_msgpack_is_one_map_with_str_keys() -> None:
    data = encode({"type": "delta", "text": "é"}, Encoding.MSGPACK)
    assert data[0] & 0xF0 == 0x80  # fixmap
    assert msgpack.unpackb(data, raw=False) == {"type": "delta", "text": "é"}


def test_decode_object_returns_the_mapping(enc: Encoding) -> None:
    obj = {"type": "ping", "nested": {"a": [1, 2.5, None, True, "x"]}}
    assert decode_object(wire(obj, enc), enc, DEFAULT_LIMITS) == obj


# --------------------------------------------------------------------------------------------
# unknown fields, ref


@pytest.mark.parametrize("frame", CLIENT_FRAMES, ids=lambda f: f.TYPE)
def test_unknown_client_fields_are_ignored(frame: ClientFrame, enc: Encoding) -> None:
    obj = {**frame.to_dict(), "zz_future": {"a": [1, "b", None]}, "v": 2, "extra": None}
    assert decode_client_frame(wire(obj, enc), enc, DEFAULT_LIMITS) == frame


@pytest.mark.parametrize("frame", SERVER_FRAMES, ids=lambda f: f.TYPE)
def test_unknown_server_fields_are_ignored(frame: ServerFrame, enc: Encoding) -> None:
    obj = {**frame.to_dict(), "zz_future": [{"x": 1}], "shard": "s-9"}
    assert decode_server_frame(wire(obj, enc), enc, DEFAULT_LIMITS) == frame


def test_unknown_message_fields_are_ignored(enc: Encoding) -> None:
    message = {**USER_MSG.to_dict(), "reactions": ["+1"], "edited_at": None}
    frame = decode_server_frame(
        wire({"type": "message", "message": message}, enc), enc, DEFAULT_LIMITS
    )
    assert frame == MessageEvent(USER_MSG)


def test_ref_is_kept_on_the_decoded_frame(enc: Encoding) -> None:
    obj = {"type": "leave", "conversation_id": CONV, "ref": "q" * 64}
    frame = decode_client_frame(wire(obj, enc), enc, DEFAULT_LIMITS)
    assert frame.ref == "q" * 64


@pytest.mark.parametrize(
    "obj",
    [
        {"type": "send", "conversation_id": 5, "client_msg_id": "c", "text": "t"},
        {"type": "history", "conversation_id": CONV, "limit": 0},
        {"type": "join", "conversation_id": CONV, "since": {"offset": "1", "epoch": "e"}},
        {"type": "no_such_type"},
    ],
    ids=["bad_field", "bad_limit", "bad_since", "unknown_type"],
)
def test_errors_echo_a_valid_ref(obj: dict[str, Any], enc: Encoding) -> None:
    err = client_obj_error({**obj, "ref": "r-42"}, enc)
    assert err.ref == "r-42"


@pytest.mark.parametrize("ref", ["r" * 65, 7, True, ["r"], {"r": 1}, ""])
def test_invalid_ref_is_a_bad_frame_without_ref(ref: Any, enc: Encoding) -> None:
    err = client_obj_error({"type": "ping", "ref": ref}, enc)
    assert err.code is ErrorCode.BAD_FRAME
    assert err.ref is None
    assert "ref" in err.message


def test_null_ref_is_no_ref(enc: Encoding) -> None:
    assert (
        decode_client_frame(wire({"type": "ping", "ref": None}, enc), enc, DEFAULT_LIMITS) == Ping()
    )


def test_server_ref_over_64_is_a_bad_frame(enc: Encoding) -> None:
    obj = {"type": "left", "conversation_id": CONV, "ref": "r" * 65}
    with pytest.raises(ProtocolError) as info:
        decode_server_frame(wire(obj, enc), enc, DEFAULT_LIMITS)
    assert info.value.code is ErrorCode.BAD_FRAME


# --------------------------------------------------------------------------------------------
# malformed payloads

INVALID_JSON = ["", " ", "{", '{"type":"ping"', "{'type':'ping'}", "nope", '{"type":"ping"}x',
                '{"type":"ping",}', "\ufeff{}", '{"a":"\x00"}']  # fmt: skip
INVALID_MSGPACK = [b"", b"\xc1", b"\x81", b"\x81\xa4type", b"\x80\x80", b"\xdf\xff\xff\xff\xff",
                   b"\x81\xa4type\xa3\xff\xfe\xfd", b"\x81\x01\xa4ping"]  # fmt: skip


@pytest.mark.parametrize("text", INVALID_JSON)
def test_invalid_json_is_a_bad_frame(text: str) -> None:
    err = client_error(text, Encoding.JSON)
    assert err.code is ErrorCode.BAD_FRAME


@pytest.mark.parametrize("data", INVALID_MSGPACK)
def test_invalid_msgpack_is_a_bad_frame(data: bytes) -> None:
    err = client_error(data, Encoding.MSGPACK)
    assert err.code is ErrorCode.BAD_FRAME


@pytest.mark.parametrize("obj", [[], [{"type": "ping"}], 5, 2.5, "ping", None, True, False])
def test_non_object_is_a_bad_frame(obj: Any, enc: Encoding) -> None:
    assert client_obj_error(obj, enc).code is ErrorCode.BAD_FRAME
    with pytest.raises(ProtocolError) as info:
        decode_server_frame(wire(obj, enc), enc, DEFAULT_LIMITS)
    assert info.value.code is ErrorCode.BAD_FRAME


@pytest.mark.parametrize(
    "obj",
    [{}, {"conversation_id": CONV}, {"type": None}, {"type": 5}, {"type": True},
     {"type": ["ping"]}, {"type": {"name": "ping"}}, {"Type": "ping"}],
)  # fmt: skip
def test_missing_or_non_string_type_is_a_bad_frame(obj: dict[str, Any], enc: Encoding) -> None:
    assert client_obj_error(obj, enc).code is ErrorCode.BAD_FRAME
    with pytest.raises(ProtocolError) as info:
        decode_server_frame(wire(obj, enc), enc, DEFAULT_LIMITS)
    assert info.value.code is ErrorCode.BAD_FRAME


@pytest.mark.parametrize("kind", ["", "PING", "shout", "hello", "gen_end", "x" * 1000])
def test_unknown_client_type(kind: str, enc: Encoding) -> None:
    err = client_obj_error({"type": kind}, enc)
    assert err.code is ErrorCode.UNKNOWN_TYPE
    assert len(err.message) < 200


@pytest.mark.parametrize("kind", ["send", "auth", "join", "shout"])
def test_unknown_server_type(kind: str, enc: Encoding) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_server_frame(wire({"type": kind}, enc), enc, DEFAULT_LIMITS)
    assert info.value.code is ErrorCode.UNKNOWN_TYPE


SEND = {"type": "send", "conversation_id": CONV, "client_msg_id": "c-1", "text": "hi"}


@pytest.mark.parametrize(
    "obj",
    [
        {**SEND, "conversation_id": 12345},
        {**SEND, "conversation_id": None},
        {**SEND, "conversation_id": ""},
        {**SEND, "conversation_id": "c" * 65},
        {**SEND, "client_msg_id": 1},
        {**SEND, "client_msg_id": ""},
        {**SEND, "text": ["hi"]},
        {**SEND, "text": None},
        {**SEND, "text": ""},
        {k: v for k, v in SEND.items() if k != "text"},
        {"type": "auth"},
        {"type": "auth", "token": 5},
        {"type": "auth", "token": "t" * 4097},
        {"type": "join", "conversation_id": [CONV]},
        {"type": "join", "conversation_id": CONV, "since": [0, "e"]},
        {"type": "join", "conversation_id": CONV, "since": "0:e"},
        {"type": "join", "conversation_id": CONV, "since": {"offset": 1}},
        {"type": "join", "conversation_id": CONV, "since": {"offset": True, "epoch": "e"}},
        {"type": "join", "conversation_id": CONV, "since": {"offset": -1, "epoch": "e"}},
        {"type": "join", "conversation_id": CONV, "since": {"offset": 1.0, "epoch": "e"}},
        {"type": "join", "conversation_id": CONV, "since": {"offset": 2**62 + 1, "epoch": "e"}},
        {"type": "join", "conversation_id": CONV, "since": {"offset": 1, "epoch": 1}},
        {"type": "leave"},
        {"type": "cancel", "generation_id": 7},
        {"type": "typing", "conversation_id": False},
        {"type": "history", "conversation_id": CONV, "limit": "5"},
        {"type": "history", "conversation_id": CONV, "limit": True},
        {"type": "history", "conversation_id": CONV, "limit": 5.0},
        {"type": "history", "conversation_id": CONV, "before": "10"},
        {"type": "history", "conversation_id": CONV, "before": False},
        {"type": "history", "conversation_id": CONV, "before": 0},
        {"type": "ping", "ts": True},
        {"type": "ping", "ts": [1]},
        {"type": "ping", "ts": {"t": 1}},
        {"type": "ping", "ts": "t" * 65},
        {"type": "ping", "ts": 2**63},
    ],
)
def test_wrong_field_types_are_bad_frames(obj: dict[str, Any], enc: Encoding) -> None:
    err = client_obj_error(obj, enc)
    assert err.code is ErrorCode.BAD_FRAME, err


def test_text_over_max_text_chars_is_too_large(enc: Encoding) -> None:
    ok = {**SEND, "text": "é" * DEFAULT_LIMITS.max_text_chars}
    frame = decode_client_frame(wire(ok, enc), enc, DEFAULT_LIMITS)
    assert isinstance(frame, Send) and len(frame.text) == DEFAULT_LIMITS.max_text_chars
    err = client_obj_error(
        {**SEND, "text": "x" * (DEFAULT_LIMITS.max_text_chars + 1), "ref": "r"}, enc
    )
    assert err.code is ErrorCode.TOO_LARGE
    assert err.ref == "r"


def test_text_limit_follows_the_limits_object(enc: Encoding) -> None:
    limits = Limits(max_text_chars=10)
    assert decode_client_frame(wire({**SEND, "text": "x" * 10}, enc), enc, limits) == Send(
        CONV, "c-1", "x" * 10
    )
    assert client_obj_error({**SEND, "text": "x" * 11}, enc, limits).code is ErrorCode.TOO_LARGE


def test_client_msg_id_over_64_is_a_bad_frame(enc: Encoding) -> None:
    ok = decode_client_frame(wire({**SEND, "client_msg_id": "m" * 64}, enc), enc, DEFAULT_LIMITS)
    assert isinstance(ok, Send) and ok.client_msg_id == "m" * 64
    err = client_obj_error({**SEND, "client_msg_id": "m" * 65}, enc)
    assert err.code is ErrorCode.BAD_FRAME


@pytest.mark.parametrize("limit", [0, 101, -1, 10**6])
def test_history_limit_out_of_range_is_a_bad_frame(limit: int, enc: Encoding) -> None:
    err = client_obj_error({"type": "history", "conversation_id": CONV, "limit": limit}, enc)
    assert err.code is ErrorCode.BAD_FRAME


@pytest.mark.parametrize("limit", [1, 50, 100])
def test_history_limit_in_range(limit: int, enc: Encoding) -> None:
    obj = {"type": "history", "conversation_id": CONV, "limit": limit}
    frame = decode_client_frame(wire(obj, enc), enc, DEFAULT_LIMITS)
    assert frame == History(CONV, limit=limit)


def test_history_default_limit() -> None:
    assert History(CONV).effective_limit(DEFAULT_LIMITS) == 50
    assert History(CONV, limit=7).effective_limit(DEFAULT_LIMITS) == 7


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity", "1e400", "-1e400"])
def test_json_nan_and_infinity_are_bad_frames(token: str) -> None:
    err = client_error('{"type":"ping","ts":' + token + "}", Encoding.JSON)
    assert err.code is ErrorCode.BAD_FRAME
    if "e" not in token:  # the literals are no JSON anywhere, even in a field nobody reads
        err = client_error('{"type":"ping","x":[' + token + "]}", Encoding.JSON)
        assert err.code is ErrorCode.BAD_FRAME


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_msgpack_non_finite_ts_is_a_bad_frame(value: float) -> None:
    data = msgpack.packb({"type": "ping", "ts": value})
    assert client_error(data, Encoding.MSGPACK).code is ErrorCode.BAD_FRAME


def test_binary_payload_on_json_is_a_bad_frame() -> None:
    err = client_error(b'{"type":"ping"}', Encoding.JSON)
    assert err.code is ErrorCode.BAD_FRAME
    err = client_error(bytearray(b'{"type":"ping"}'), Encoding.JSON)  # type: ignore[arg-type]
    assert err.code is ErrorCode.BAD_FRAME


def test_text_payload_on_msgpack_is_a_bad_frame() -> None:
    err = client_error('{"type":"ping"}', Encoding.MSGPACK)
    assert err.code is ErrorCode.BAD_FRAME
    with pytest.raises(ProtocolError) as info:
        decode_server_frame('{"type":"pong"}', Encoding.MSGPACK, DEFAULT_LIMITS)
    assert info.value.code is ErrorCode.BAD_FRAME


def test_payload_over_max_frame_bytes_is_too_large(enc: Encoding) -> None:
    limit = DEFAULT_LIMITS.max_frame_bytes
    big = wire({"type": "ping", "pad": "x" * limit}, enc)
    assert client_error(big, enc).code is ErrorCode.TOO_LARGE
    with pytest.raises(ProtocolError) as info:
        decode_server_frame(big, enc, DEFAULT_LIMITS)
    assert info.value.code is ErrorCode.TOO_LARGE
    # garbage that is too large is refused for its size before it is parsed
    junk: str | bytes = "[" * (limit + 1) if enc is Encoding.JSON else b"\xc1" * (limit + 1)
    assert client_error(junk, enc).code is ErrorCode.TOO_LARGE


def test_frame_size_is_counted_in_utf8_bytes_and_exact_size_passes() -> None:
    limits = Limits(max_frame_bytes=64)
    head = '{"type":"ping","pad":"'
    exact = head + "x" * (64 - len(head) - 2) + '"}'
    assert len(exact.encode()) == 64
    assert decode_client_frame(exact, Encoding.JSON, limits) == Ping()
    wide = head + "é" * 30 + '"}'  # 54 characters, 84 bytes
    assert len(wide) <= 64 < len(wide.encode())
    assert client_error(wide, Encoding.JSON, limits).code is ErrorCode.TOO_LARGE


def test_deep_nesting_is_a_bad_frame_not_a_crash(enc: Encoding) -> None:
    depth = 30_000
    if enc is Encoding.JSON:
        data: str | bytes = '{"type":"ping","x":' + "[" * depth + "]" * depth + "}"
    else:
        data = b"\x82\xa4type\xa4ping\xa1x" + b"\x91" * depth + b"\x90"
    assert client_error(data, enc).code is ErrorCode.BAD_FRAME


def test_nesting_is_bounded_by_max_depth(enc: Encoding) -> None:
    def nest(levels: int) -> Any:
        nested: Any = "leaf"
        for _ in range(levels):
            nested = [nested]
        return nested

    limit = DEFAULT_LIMITS.max_depth
    # the frame object itself is level 1
    frame = decode_client_frame(
        wire({"type": "ping", "x": nest(limit - 1)}, enc), enc, DEFAULT_LIMITS
    )
    assert frame == Ping()
    err = client_error(wire({"type": "ping", "x": nest(limit)}, enc), enc)
    assert err.code is ErrorCode.BAD_FRAME and "deeper" in err.message
    roomy = Limits(max_depth=200)
    assert decode_client_frame(wire({"type": "ping", "x": nest(150)}, enc), enc, roomy) == Ping()


def test_json_lone_surrogates_are_bad_frames() -> None:
    # escaped: valid JSON syntax, but no Unicode text, and no codec could send it back
    err = client_error('{"type":"ping","ts":"\\ud800"}', Encoding.JSON)
    assert err.code is ErrorCode.BAD_FRAME
    err = client_error('{"type":"ping","x":{"\\udfff":1}}', Encoding.JSON)
    assert err.code is ErrorCode.BAD_FRAME
    # a raw surrogate in the text itself (no transport delivers that, but nothing else escapes)
    assert client_error('{"type":"ping","ts":"\ud800"}', Encoding.JSON).code is ErrorCode.BAD_FRAME
    # an escaped surrogate *pair* is one ordinary character
    frame = decode_client_frame(
        '{"type":"ping","ts":"\\ud83d\\ude00"}', Encoding.JSON, DEFAULT_LIMITS
    )
    assert frame == Ping(ts="😀")
    # an escaped backslash before 'ud800' is plain text
    frame = decode_client_frame('{"type":"ping","ts":"\\\\ud800"}', Encoding.JSON, DEFAULT_LIMITS)
    assert frame == Ping(ts="\\ud800")


def test_msgpack_invalid_utf8_and_non_string_keys_are_bad_frames() -> None:
    surrogate = msgpack.packb({"type": "ping", "ts": "\ud800"}, unicode_errors="surrogatepass")
    assert client_error(surrogate, Encoding.MSGPACK).code is ErrorCode.BAD_FRAME
    int_key = msgpack.packb({"type": "ping", 1: "x"})
    assert client_error(int_key, Encoding.MSGPACK).code is ErrorCode.BAD_FRAME
    bytes_type = msgpack.packb({"type": b"ping"}, use_bin_type=True)
    assert client_error(bytes_type, Encoding.MSGPACK).code is ErrorCode.BAD_FRAME


def test_msgpack_ext_values_are_bad_field_values() -> None:
    data = msgpack.packb({"type": "ping", "ts": msgpack.ExtType(5, b"\x00")})
    assert client_error(data, Encoding.MSGPACK).code is ErrorCode.BAD_FRAME
    data = msgpack.packb({"type": "ping", "ts": msgpack.Timestamp(1, 0)})
    assert client_error(data, Encoding.MSGPACK).code is ErrorCode.BAD_FRAME


@pytest.mark.parametrize(
    "obj",
    [
        {"type": "gen_end", "conversation_id": CONV, "generation_id": GEN, "finish_reason": "oops",
         "usage": {"input_tokens": 1, "output_tokens": 1}, "message": None},
        {"type": "gen_end", "conversation_id": CONV, "generation_id": GEN, "finish_reason": "stop",
         "usage": {"input_tokens": -1, "output_tokens": 1}, "message": None},
        {"type": "error", "code": "teapot", "message": "x"},
        {"type": "error", "code": "internal", "message": "x", "retry_after_ms": -5},
        {"type": "history", "conversation_id": CONV, "messages": ["not a message"],
         "has_more": False},
        {"type": "history", "conversation_id": CONV, "messages": [], "has_more": 0},
        {"type": "message", "message": {**USER_MSG.to_dict(), "role": "robot"}},
        {"type": "message", "message": {**USER_MSG.to_dict(), "offset": 0}},
        {"type": "joined", "conversation_id": CONV, "epoch": "e", "offset": 1, "recovered": "yes",
         "messages": []},
        {"type": "delta", "conversation_id": CONV, "generation_id": GEN, "seq": 0, "text": "x"},
        {"type": "hello", "session_id": "s", "user_id": "u", "server_id": "n", "heartbeat_s": 1.5,
         "max_frame_bytes": 1, "protocol": 1},
        {"type": "presence", "conversation_id": CONV, "online": "alice"},
        {"type": "presence", "conversation_id": CONV, "online": ["alice", 7]},
        {"type": "presence", "conversation_id": CONV, "online": [""]},
    ],
)  # fmt: skip
def test_invalid_server_frames_are_bad_frames(obj: dict[str, Any], enc: Encoding) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_server_frame(wire(obj, enc), enc, DEFAULT_LIMITS)
    assert info.value.code is ErrorCode.BAD_FRAME


# --------------------------------------------------------------------------------------------
# negotiation, encodings, limits


@pytest.mark.parametrize(
    ("offered", "expected"),
    [
        ([], Encoding.JSON),
        (["chat.v1.json"], Encoding.JSON),
        (["chat.v1.msgpack"], Encoding.MSGPACK),
        (["chat.v1.msgpack", "chat.v1.json"], Encoding.MSGPACK),
        (["chat.v1.json", "chat.v1.msgpack"], Encoding.JSON),
        (["graphql-ws", " chat.v1.msgpack "], Encoding.MSGPACK),
        (["chat.v2.json"], None),
        (["json", "msgpack"], None),
        (["CHAT.V1.JSON"], None),
        ([""], None),
    ],
)
def test_negotiate(offered: list[str], expected: Encoding | None) -> None:
    assert negotiate(offered) is expected


def test_encoding_properties() -> None:
    assert SUBPROTOCOLS == ("chat.v1.json", "chat.v1.msgpack")
    assert Encoding.JSON.subprotocol == "chat.v1.json" and not Encoding.JSON.binary
    assert Encoding.MSGPACK.subprotocol == "chat.v1.msgpack" and Encoding.MSGPACK.binary


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_frame_bytes": 0},
        {"max_text_chars": -1},
        {"max_client_msg_id_chars": 0},
        {"max_ref_chars": True},
        {"max_id_chars": 1.5},
        {"history_max_limit": 0},
        {"history_default_limit": 0},
        {"history_max_limit": 10, "history_default_limit": 11},
        {"max_token_chars": "100"},
    ],
)
def test_limits_reject_non_positive_and_inconsistent_values(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Limits(**kwargs)


def test_limits_defaults_match_the_protocol() -> None:
    assert DEFAULT_LIMITS.max_client_msg_id_chars == 64
    assert DEFAULT_LIMITS.max_ref_chars == 64
    assert DEFAULT_LIMITS.history_max_limit == 100
    assert DEFAULT_LIMITS.history_default_limit == 50
    assert Limits(max_frame_bytes=1, history_max_limit=1, history_default_limit=1)


def test_msgpack_lengths_are_bounded_by_the_protocol_limits() -> None:
    limits = Limits(max_members=5, history_max_limit=5, history_default_limit=5, max_object_keys=4)
    longest = [0] * limits.max_array_items
    ok = {"type": "ping", "x": longest}
    assert decode_client_frame(msgpack.packb(ok), Encoding.MSGPACK, limits) == Ping()
    too_long = msgpack.packb({"type": "ping", "x": [*longest, 0]})
    assert client_error(too_long, Encoding.MSGPACK, limits).code is ErrorCode.BAD_FRAME
    wide = msgpack.packb({"type": "ping", "a": 1, "b": 2, "c": 3, "d": 4})
    assert client_error(wide, Encoding.MSGPACK, limits).code is ErrorCode.BAD_FRAME
    ext = msgpack.packb({"type": "ping", "x": msgpack.ExtType(1, b"abc")})
    assert client_error(ext, Encoding.MSGPACK, limits).code is ErrorCode.BAD_FRAME


@pytest.mark.parametrize(
    ("field", "value", "accepted"),
    [
        ("text", "two\tcolumns\nand lines", True),
        ("text", "nul \x00 inside", False),
        ("text", "carriage\rreturn", False),
        ("text", "escape \x1b[31m red", False),
        ("text", "delete \x7f", False),
        ("client_msg_id", "tab\there", False),
        ("client_msg_id", "new\nline", False),
        ("ref", "bell\x07", False),
    ],
)
def test_text_fields_refuse_nul_and_control_characters(
    enc: Encoding, field: str, value: str, accepted: bool
) -> None:
    frame = {
        "type": "send",
        "conversation_id": "00000000-0000-4000-8000-000000000001",
        "client_msg_id": "m1",
        "text": "hello",
        "ref": "r1",
    }
    frame[field] = value
    if accepted:
        sent = decode_client_frame(wire(frame, enc), enc, DEFAULT_LIMITS)
        assert getattr(sent, field) == value
    else:
        err = client_error(wire(frame, enc), enc)
        assert err.code is ErrorCode.BAD_FRAME and f"'{field}'" in err.message


def test_text_problem_names_what_is_wrong() -> None:
    assert text_problem("fine text") is None
    assert text_problem("a\nb", multiline=True) is None
    assert text_problem("a\nb") == "a control character (U+000A)"
    assert text_problem("a\x00b", multiline=True) == "a NUL character"
    assert text_problem("\ud800", multiline=True) == "a lone surrogate (not Unicode text)"
