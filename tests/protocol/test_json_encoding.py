"""JSON frames are written by orjson: the standard encoder's text, and its refusals kept."""

from __future__ import annotations

import json
import math
from datetime import UTC, date, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import (
    DEFAULT_LIMITS,
    Encoding,
    ErrorCode,
    Ping,
    ProtocolError,
    decode_object,
    encode,
)


def standard(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


# Every Unicode scalar value (control characters and non-BMP included), no lone surrogates.
texts = st.text(st.characters(codec="utf-8", exclude_categories=()), max_size=12)
exact_scalars = (
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1) | texts
)
floats = st.floats(allow_nan=False, allow_infinity=False)


def values(scalars: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(
        texts,
        st.recursive(
            scalars,
            lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
            max_leaves=20,
        ),
        max_size=6,
    )


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values(exact_scalars))
def test_frames_without_floats_are_the_standard_encoders_bytes(value: dict[str, Any]) -> None:
    assert encode(value, Encoding.JSON) == standard(value)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values(exact_scalars | floats))
def test_floats_may_be_spelled_otherwise_but_read_back_the_same(value: dict[str, Any]) -> None:
    # 1e-05 is written 0.00001: another spelling of the same double.
    assert json.loads(encode(value, Encoding.JSON)) == json.loads(standard(value))


@pytest.mark.parametrize(
    "value",
    [
        {"offset": 2**64},  # past 64 bits: orjson refuses it
        {"offset": -(2**63) - 1},
        {"n": 10**30, "nested": [{"m": -(10**30)}]},
        {1: "an integer key", "b": True},  # the standard encoder spells it as a string
    ],
)
def test_what_orjson_refuses_the_standard_encoder_writes(value: dict[Any, Any]) -> None:
    assert encode(value, Encoding.JSON) == standard(value)


@pytest.mark.parametrize(
    "value", [datetime(2026, 12, 6, tzinfo=UTC), Ping(ts=1), date(2026, 12, 6)]
)
def test_objects_the_standard_encoder_refused_are_still_refused(value: object) -> None:
    with pytest.raises(TypeError):
        encode({"type": "pong", "at": value}, Encoding.JSON)


def test_a_lone_surrogate_fails_as_before_at_the_utf8_step() -> None:
    with pytest.raises(UnicodeEncodeError):
        encode({"text": "a\ud800b"}, Encoding.JSON)


@pytest.mark.parametrize(
    "literal",
    ["NaN", "-Infinity", "1e400", '"\\ud800"', '"\\udfff x"', '"\\ud800\\u0041"'],
)
def test_decoding_refuses_what_json_does_not_allow(literal: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        decode_object('{"type":"ping","ts":' + literal + "}", Encoding.JSON, DEFAULT_LIMITS)
    assert caught.value.code is ErrorCode.BAD_FRAME


def test_decoding_takes_escaped_surrogate_pairs_and_big_numbers() -> None:
    frame = decode_object(
        '{"type":"ping","ts":"\\ud83d\\ude00","n":18446744073709551615,"f":-0.0}',
        Encoding.JSON,
        DEFAULT_LIMITS,
    )
    assert frame["ts"] == "\U0001f600"
    assert frame["n"] == 2**64 - 1
    assert math.copysign(1.0, frame["f"]) == -1.0
