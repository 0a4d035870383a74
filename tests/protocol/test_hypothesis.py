"""Property tests: every valid frame round-trips through both encodings; any input at all
either decodes into a frame that itself round-trips, or raises ``ProtocolError``."""

from __future__ import annotations

import json
import math
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import (
    CLIENT_TYPES,
    DEFAULT_LIMITS,
    SERVER_TYPES,
    Ack,
    Auth,
    Cancel,
    ClientFrame,
    Delta,
    Encoding,
    ErrorCode,
    ErrorFrame,
    FinishReason,
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
    Message,
    MessageEvent,
    Ping,
    Pong,
    Presence,
    ProtocolError,
    Reconnect,
    Role,
    Send,
    ServerFrame,
    Since,
    Typing,
    TypingNotice,
    Usage,
    decode_client_frame,
    decode_server_frame,
    encode_frame,
)

ENCODINGS = [Encoding.JSON, Encoding.MSGPACK]
LIMITS = DEFAULT_LIMITS
ROUND_TRIP = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---------------------------------------------------------------------------------------------
# valid frames

# any Unicode scalar value but control characters: surrogates are not text and cannot be sent
# by either encoding, and fields refuse control characters (test_codec_conformance checks them)
unicode_chars = st.characters(codec="utf-8", exclude_categories=("Cc",))
any_chars = st.characters(exclude_categories=())  # surrogates included, for fuzzing


def text(min_size: int = 0, max_size: int = 64) -> st.SearchStrategy[str]:
    return st.text(unicode_chars, min_size=min_size, max_size=max_size)


ids = text(1, LIMITS.max_id_chars)
uuids = st.uuids().map(str)  # conversation and generation ids of client frames
refs = st.none() | text(1, LIMITS.max_ref_chars)
counts = st.integers(min_value=0, max_value=2**62)
finite_floats = st.floats(allow_nan=False, allow_infinity=False)
ts_values = (
    st.none()
    | st.integers(min_value=-(2**63) + 1, max_value=2**63 - 1)
    | finite_floats.filter(lambda f: abs(f) < 2**63)
    | text(0, LIMITS.max_id_chars)
)

CLIENT_STRATEGIES: dict[type[Any], st.SearchStrategy[Any]] = {
    Auth: st.builds(Auth, token=text(1, 300), ref=refs),
    Join: st.builds(
        Join,
        conversation_id=uuids,
        since=st.none() | st.builds(Since, offset=counts, epoch=ids),
        ref=refs,
    ),
    Leave: st.builds(Leave, conversation_id=uuids, ref=refs),
    Send: st.builds(
        Send,
        conversation_id=uuids,
        client_msg_id=text(1, LIMITS.max_client_msg_id_chars),
        text=text(1, 300) | text(LIMITS.max_text_chars - 3, LIMITS.max_text_chars),
        ref=refs,
    ),
    Cancel: st.builds(Cancel, generation_id=uuids, ref=refs),
    Typing: st.builds(Typing, conversation_id=uuids, ref=refs),
    History: st.builds(
        History,
        conversation_id=uuids,
        before=st.none() | st.integers(min_value=1, max_value=2**62),
        limit=st.none() | st.integers(min_value=1, max_value=LIMITS.history_max_limit),
        ref=refs,
    ),
    Ping: st.builds(Ping, ts=ts_values, ref=refs),
}
client_frames: st.SearchStrategy[ClientFrame] = st.one_of(*CLIENT_STRATEGIES.values())

usages = st.builds(Usage, input_tokens=counts, output_tokens=counts)
messages = st.builds(
    Message,
    id=ids,
    conversation_id=ids,
    offset=st.integers(min_value=1, max_value=2**62),
    role=st.sampled_from([r.value for r in Role]),
    text=text(0, 200),
    created_at=text(1, 64),
    user_id=st.none() | ids,
    agent_id=st.none() | ids,
    client_msg_id=st.none() | ids,
    finish_reason=st.none() | st.sampled_from([r.value for r in FinishReason]),
    usage=st.none() | usages,
    model=st.none() | text(1, 128),
    reply_to=st.none() | ids,
)
message_lists = st.lists(messages, max_size=4).map(tuple)

SERVER_STRATEGIES: dict[type[Any], st.SearchStrategy[Any]] = {
    Hello: st.builds(
        Hello,
        session_id=ids,
        user_id=ids,
        server_id=ids,
        heartbeat_s=st.integers(min_value=0, max_value=3600),
        max_frame_bytes=st.integers(min_value=1, max_value=2**31),
        protocol=st.just(1),
        ref=refs,
    ),
    Joined: st.builds(
        Joined,
        conversation_id=ids,
        epoch=ids,
        offset=counts,
        recovered=st.booleans(),
        messages=message_lists,
        generation=st.none()
        | st.builds(GenerationSnapshot, generation_id=ids, seq=counts, text=text(0, 300)),
        ref=refs,
    ),
    Left: st.builds(Left, conversation_id=ids, ref=refs),
    Ack: st.builds(
        Ack,
        client_msg_id=ids,
        message_id=ids,
        offset=st.integers(min_value=1, max_value=2**62),
        created_at=text(1, 64),
        duplicate=st.booleans(),
        ref=refs,
    ),
    MessageEvent: st.builds(MessageEvent, message=messages, ref=refs),
    GenStart: st.builds(
        GenStart,
        conversation_id=ids,
        generation_id=ids,
        reply_to=ids,
        agent_id=ids,
        model=text(1, 128),
        ref=refs,
        thinking=st.booleans(),
    ),
    Delta: st.builds(
        Delta,
        conversation_id=ids,
        generation_id=ids,
        seq=st.integers(min_value=1, max_value=2**62),
        text=text(0, 300),
        ref=refs,
    ),
    GenEnd: st.builds(
        GenEnd,
        conversation_id=ids,
        generation_id=ids,
        finish_reason=st.sampled_from([r.value for r in FinishReason]),
        usage=usages,
        message=st.none() | messages,
        error=st.none() | text(1, 1024),
        ref=refs,
        error_code=st.none() | text(1, 64),
        retry_after_ms=st.none() | counts,
        thinking_tokens=st.none() | counts,
    ),
    TypingNotice: st.builds(TypingNotice, conversation_id=ids, user_id=ids, ref=refs),
    Presence: st.builds(
        Presence,
        conversation_id=ids,
        online=st.lists(ids, max_size=5).map(tuple),
        ref=refs,
    ),
    HistoryPage: st.builds(
        HistoryPage, conversation_id=ids, messages=message_lists, has_more=st.booleans(), ref=refs
    ),
    Pong: st.builds(Pong, ts=ts_values, ref=refs),
    Reconnect: st.builds(Reconnect, reason=text(1, 256), after_ms=counts, ref=refs),
    ErrorFrame: st.builds(
        ErrorFrame,
        code=st.sampled_from([c.value for c in ErrorCode]),
        message=text(0, 300),
        retry_after_ms=st.none() | counts,
        ref=refs,
    ),
}
server_frames: st.SearchStrategy[ServerFrame] = st.one_of(*SERVER_STRATEGIES.values())


def to_wire(data: bytes, encoding: Encoding) -> str | bytes:
    return data.decode() if encoding is Encoding.JSON else data


def round_trips(frame: ClientFrame | ServerFrame, client: bool) -> None:
    """``frame`` survives encode -> decode in both encodings, byte for byte on re-encode."""
    for enc in ENCODINGS:
        data = encode_frame(frame, enc)
        if client:
            back: ClientFrame | ServerFrame = decode_client_frame(to_wire(data, enc), enc, LIMITS)
        else:
            back = decode_server_frame(to_wire(data, enc), enc, LIMITS)
        assert back == frame, (enc, frame, back)
        assert type(back) is type(frame)
        assert encode_frame(back, enc) == data


def test_strategies_cover_every_frame_type() -> None:
    assert {cls.TYPE for cls in CLIENT_STRATEGIES} == CLIENT_TYPES
    assert {cls.TYPE for cls in SERVER_STRATEGIES} == SERVER_TYPES


@ROUND_TRIP
@given(client_frames)
def test_client_frames_round_trip(frame: ClientFrame) -> None:
    round_trips(frame, client=True)


@ROUND_TRIP
@given(server_frames)
def test_server_frames_round_trip(frame: ServerFrame) -> None:
    round_trips(frame, client=False)


# ---------------------------------------------------------------------------------------------
# fuzzing: only ProtocolError may escape; whatever decodes is a frame that round-trips


def decode_both_ways(data: str | bytes, enc: Encoding) -> None:
    try:
        client = decode_client_frame(data, enc, LIMITS)
    except ProtocolError as exc:
        assert isinstance(exc.code, ErrorCode)
        assert exc.ref is None or (
            isinstance(exc.ref, str) and len(exc.ref) <= LIMITS.max_ref_chars
        )
    else:
        round_trips(client, client=True)
    try:
        server = decode_server_frame(data, enc, LIMITS)
    except ProtocolError as exc:
        assert isinstance(exc.code, ErrorCode)
    else:
        round_trips(server, client=False)


FIELD_NAMES = sorted(
    {
        "type", "ref", "token", "conversation_id", "since", "offset", "epoch", "client_msg_id",
        "text", "generation_id", "before", "limit", "ts", "session_id", "user_id", "server_id",
        "heartbeat_s", "max_frame_bytes", "protocol", "recovered", "messages", "generation",
        "seq", "message_id", "created_at", "duplicate", "message", "reply_to", "agent_id",
        "model", "finish_reason", "usage", "input_tokens", "output_tokens", "error",
        "has_more", "reason", "after_ms", "code", "retry_after_ms", "id", "role",
    }
)  # fmt: skip
TYPE_NAMES = sorted(CLIENT_TYPES | SERVER_TYPES)

odd_text = st.text(any_chars, max_size=20) | st.sampled_from(
    ["", "\x00", "\ud800", "\udfff", "\ud83d\ude00", "\u202e", "\ufeff", "é", "\U0010ffff", "NaN"]
)
keys = st.sampled_from(FIELD_NAMES) | odd_text
surrogates = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF, exclude_categories=())
tricky_strings = st.text(surrogates | unicode_chars, min_size=1, max_size=8)
huge_ints = st.integers() | st.sampled_from(
    [2**62, 2**62 + 1, 2**63 - 1, 2**63, -(2**63), 2**64 - 1, 2**64, -(2**64), 10**30]
)
odd_floats = st.floats() | st.sampled_from([0.0, -0.0, 1e308, 5e-324, math.nan, math.inf])
json_scalars = st.none() | st.booleans() | huge_ints | odd_floats | odd_text
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
    max_leaves=20,
)
msgpack_ints = st.integers(min_value=-(2**63), max_value=2**64 - 1)
msgpack_scalars = (
    st.none()
    | st.booleans()
    | msgpack_ints
    | odd_floats
    | odd_text
    | st.binary(max_size=16)
    | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=8))
    | st.builds(msgpack.Timestamp, st.integers(0, 2**32), st.integers(0, 999_999_999))
)
msgpack_keys = keys | st.binary(max_size=8) | msgpack_ints | st.booleans() | st.none()
msgpack_values = st.recursive(
    msgpack_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(msgpack_keys, inner, max_size=4),
    max_leaves=20,
)


def frame_like(values: st.SearchStrategy[Any], keys_: st.SearchStrategy[Any]) -> Any:
    """Objects shaped like frames (a known type, known field names) with arbitrary values."""
    names = st.sampled_from(FIELD_NAMES)
    near_miss: st.SearchStrategy[Any] = st.sampled_from(
        [0, 1, -1, 2**62, "x", "", "user", "stop", True, None, {}, []]
    )
    leaf = near_miss | values
    sub_object = st.dictionaries(names, leaf, max_size=8)  # like a message, since or usage
    field_value = leaf | sub_object | st.lists(sub_object, max_size=3)
    return st.builds(
        lambda kind, fields, extra: {**extra, **fields, "type": kind},
        st.sampled_from(TYPE_NAMES) | values,
        st.dictionaries(names, field_value, max_size=10),
        st.dictionaries(keys_, values, max_size=3),
    )


@st.composite
def mutated_frames(draw: st.DrawFn, values: st.SearchStrategy[Any]) -> dict[str, Any]:
    """A valid frame (client or server) with a few fields replaced, removed or added."""
    frame = draw(client_frames | server_frames)
    obj: dict[str, Any] = frame.to_dict()
    for _ in range(draw(st.integers(min_value=0, max_value=3))):
        target = obj
        nested = [k for k, v in obj.items() if isinstance(v, dict)]
        into_nested: bool = draw(st.booleans())
        if nested and into_nested:
            target = obj[draw(st.sampled_from(sorted(nested)))]
        present = sorted(k for k in target if isinstance(k, str))
        names = st.sampled_from(FIELD_NAMES)
        name = draw(st.sampled_from(present) | names if present else names)
        action = draw(st.integers(min_value=0, max_value=3))
        if action == 0:
            target.pop(name, None)
        elif action == 1 and isinstance(target.get(name), str):
            target[name] = draw(tricky_strings)  # same type, odd content
        else:
            target[name] = draw(values)
    return obj


def pack(value: Any) -> bytes | None:
    """MessagePack bytes of ``value``; lone surrogates become invalid UTF-8 on purpose."""
    try:
        data: bytes = msgpack.packb(value, use_bin_type=True, unicode_errors="surrogatepass")
    except (OverflowError, ValueError, TypeError):
        return None
    return data


def dump(value: Any, ensure_ascii: bool) -> str | None:
    try:
        return json.dumps(value, ensure_ascii=ensure_ascii)  # NaN and Infinity stay in
    except (ValueError, TypeError):  # e.g. an int too long for str()
        return None


@FUZZ
@given(st.binary(max_size=300))
@pytest.mark.parametrize("enc", ENCODINGS, ids=lambda e: e.name.lower())
def test_arbitrary_bytes(enc: Encoding, data: bytes) -> None:
    decode_both_ways(data, enc)
    if enc is Encoding.JSON:
        # the same bytes as text: invalid UTF-8 becomes lone surrogates
        decode_both_ways(data.decode("utf-8", "surrogateescape"), enc)


@FUZZ
@given(st.text(any_chars, max_size=300) | st.from_regex(r'\A\{"type":\s*"[a-z_]{2,9}".*\}\Z'))
@pytest.mark.parametrize("enc", ENCODINGS, ids=lambda e: e.name.lower())
def test_arbitrary_text(enc: Encoding, data: str) -> None:
    decode_both_ways(data, enc)


@FUZZ
@given(json_values | frame_like(json_values, keys) | mutated_frames(json_values), st.booleans())
def test_json_like_values(value: Any, ensure_ascii: bool) -> None:
    text_ = dump(value, ensure_ascii)
    if text_ is not None:
        decode_both_ways(text_, Encoding.JSON)
    data = pack(value)
    if data is not None:
        decode_both_ways(data, Encoding.MSGPACK)


@FUZZ
@given(msgpack_values | frame_like(msgpack_values, msgpack_keys) | mutated_frames(msgpack_values))
def test_msgpack_values(value: Any) -> None:
    data = pack(value)
    if data is not None:
        decode_both_ways(data, Encoding.MSGPACK)
        decode_both_ways(data, Encoding.JSON)  # binary on JSON


@settings(max_examples=60, deadline=None)
@given(
    st.integers(min_value=1, max_value=40_000),
    st.sampled_from(["[", '{"a":', '[{"b":']),
    st.booleans(),
)
def test_deep_json_nesting(depth: int, opener: str, closed: bool) -> None:
    closer = {"[": "]", '{"a":': "}", '[{"b":': "}]"}[opener]
    body = opener * depth + ("1" + closer * depth if closed else "")
    decode_both_ways('{"type":"ping","x":' + body + "}", Encoding.JSON)
    decode_both_ways(body, Encoding.JSON)


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=1, max_value=40_000), st.sampled_from([b"\x91", b"\x81\xa1k"]))
def test_deep_msgpack_nesting(depth: int, opener: bytes) -> None:
    body = opener * depth + b"\xc0"
    decode_both_ways(b"\x82\xa4type\xa4ping\xa1x" + body, Encoding.MSGPACK)
    decode_both_ways(body, Encoding.MSGPACK)


@settings(max_examples=100, deadline=None)
@given(st.integers(min_value=0, max_value=20_000), st.sampled_from(["", "-"]))
def test_huge_json_numbers(digits: int, sign: str) -> None:
    number = sign + "9" * (digits + 1)
    for literal in (number, number + ".5", number + "e99999", "0." + "0" * digits + "1e-99999"):
        decode_both_ways('{"type":"ping","ts":' + literal + "}", Encoding.JSON)
        decode_both_ways(
            '{"type":"history","conversation_id":"c","limit":' + literal + "}", Encoding.JSON
        )
