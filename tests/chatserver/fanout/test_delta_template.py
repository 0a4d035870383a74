"""A reply's delta frames from its template: byte for byte what the regular encoder makes."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatserver.fanout.events import DeltaTemplate, Event, framed
from protocol import Delta, Encoding

CONV, GEN = str(uuid.uuid4()), str(uuid.uuid4())

TRICKY = [
    "",
    "plain words ",
    'quotes " and \\ backslashes \\" and /slashes/',
    "".join(chr(c) for c in range(0x20)) + "\x7f",  # every control character, DEL
    "line\nbreaks\r\n\ttabs \b \f",
    "\u2028 line and paragraph \u2029 separators",
    "accents: é à ü ñ, combining: e\u0301, CJK: 漢字かな, RTL: שלום مرحبا",
    "non-BMP: 😀 🧑‍🚀 𝄞 \U0010ffff, BOM \ufeff, NUL \x00 end",
    "x" * 125,  # payload sizes around the 7-bit / 16-bit header boundary
    "y" * 126,
    "z" * 70_000,  # a 64-bit length header
]


def _regular(seq: int, text: str, conversation_id: str = CONV) -> bytes:
    frame = Delta(conversation_id, GEN, seq, text).to_dict()
    return framed(frame, Encoding.JSON)


@pytest.mark.parametrize("text", TRICKY)
@pytest.mark.parametrize("seq", [1, 9, 10, 12345, 2**40])
def test_the_template_frame_is_the_encoders_frame(seq: int, text: str) -> None:
    template = DeltaTemplate(CONV, GEN)
    event = template.event(seq, text, 1.0)
    assert event.framed(False) == _regular(seq, text)
    assert template.frame(seq, text) == Delta(CONV, GEN, seq, text).to_dict()
    assert list(template.frame(seq, text)) == list(Delta(CONV, GEN, seq, text).to_dict())


@settings(max_examples=300, deadline=None)
@given(st.text(), st.integers(min_value=1, max_value=2**53))
def test_any_text_gives_the_same_bytes(text: str, seq: int) -> None:
    template = DeltaTemplate(CONV, GEN)
    try:
        regular = _regular(seq, text)
    except UnicodeEncodeError:  # a lone surrogate: no UTF-8 frame either way
        with pytest.raises(UnicodeEncodeError):
            template.event(seq, text, 1.0)
        return
    assert template.event(seq, text, 1.0).framed(False) == regular


def test_ids_that_need_escaping_are_escaped_like_the_encoder_does() -> None:
    odd = 'conv "with" \\ quotes é'
    template = DeltaTemplate(odd, GEN)
    assert template.event(3, "hi", 1.0).framed(False) == _regular(3, "hi", odd)


def test_a_lone_surrogate_fails_as_the_encoder_fails() -> None:
    with pytest.raises(UnicodeEncodeError):
        _regular(1, "bad \ud800 text")
    with pytest.raises(UnicodeEncodeError):
        DeltaTemplate(CONV, GEN).event(1, "bad \ud800 text", 1.0)


@pytest.mark.parametrize("text", TRICKY)
def test_the_template_event_is_the_regular_event(text: str) -> None:
    """Filters, MessagePack members and the broker see what ``Event(frame)`` gives them."""
    built = DeltaTemplate(CONV, GEN).event(7, text, 2.5)
    regular = Event(CONV, Delta(CONV, GEN, 7, text).to_dict(), 2.5)
    for name in ("conversation_id", "frame", "published_at", "offset", "seq", "generation_id"):
        assert getattr(built, name) == getattr(regular, name), name
    assert built.exclude_user is None and regular.exclude_user is None
    assert built.framed(True) == regular.framed(True)
    assert built.framed(False) == regular.framed(False)


@pytest.mark.parametrize("payload_size", [125, 126, 127, 65535, 65536, 65537])
def test_every_header_size_boundary(payload_size: int) -> None:
    template = DeltaTemplate("c", "g")  # short ids, so a payload can be under 126 bytes
    bare = len(template.json(5, ""))
    text = "w" * (payload_size - bare)
    assert len(template.json(5, text)) == payload_size
    regular = framed(Delta("c", "g", 5, text).to_dict(), Encoding.JSON)
    assert template.event(5, text, 1.0).framed(False) == regular
