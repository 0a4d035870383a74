"""UUID fields of client frames: exactly the canonical 8-4-4-4-12 form, in either case."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.errors import ProtocolError
from protocol.fields import req_uuid


def _canonical(text: str) -> str | None:
    """What the uuid module makes of ``text``, when that is ``text`` itself (any case)."""
    if len(text) != 36:
        return None
    try:
        parsed = str(uuid.UUID(text))
    except ValueError:
        return None
    return parsed if parsed == text.lower() else None


def _near_uuids() -> st.SearchStrategy[str]:
    """UUID strings with a character or two swapped for anything (digits of other scripts,
    braces, plus signs, underscores, spaces...)."""
    return st.builds(
        lambda u, upper, at, char: (u.upper() if upper else u)[:at] + char + u[at + 1 :],
        st.uuids().map(str),
        st.booleans(),
        st.integers(0, 35),
        st.characters(),
    )


@given(st.one_of(st.uuids().map(str), st.uuids().map(lambda u: str(u).upper()), _near_uuids()))
def test_accepts_what_the_uuid_module_gives_back_and_nothing_else(text: str) -> None:
    want = _canonical(text)
    if want is None:
        with pytest.raises(ProtocolError):
            req_uuid({"id": text}, "id")
    else:
        assert req_uuid({"id": text}, "id") == want


@pytest.mark.parametrize(
    "text",
    [
        "{12345678-1234-1234-1234-123456789abc}",
        "urn:uuid:12345678-1234-1234-1234-123456789abc",
        "12345678123412341234123456789abc",
        "12345678-1234-1234-1234-123456789abc\n",
        "１2345678-1234-1234-1234-123456789abc",  # a full-width digit
    ],
)
def test_other_spellings_are_refused(text: str) -> None:
    with pytest.raises(ProtocolError):
        req_uuid({"id": text}, "id")
