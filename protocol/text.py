"""What text a field may hold: no NUL, no control characters, no lone surrogates.

A lone surrogate is no Unicode text (JSON can spell one as an escape; no store can encode it),
NUL is refused by Postgres and truncates C strings, and other control characters only serve
to corrupt a terminal or a log line. Message text keeps tab and newline.
"""

from __future__ import annotations

import re

_FORBIDDEN_IN_LINE = re.compile("[\x00-\x1f\x7f\ud800-\udfff]")
_FORBIDDEN_IN_TEXT = re.compile("[\x00-\x08\x0b-\x1f\x7f\ud800-\udfff]")


def text_problem(value: str, *, multiline: bool = False) -> str | None:
    """Why ``value`` may not be stored (``None`` when it may): a short, safe description.

    ``multiline`` (message text) allows tab and newline; single-line fields (ids, titles)
    allow neither.
    """
    if value.isprintable():
        # Every forbidden character is unprintable (Cc, Cs): most text is done in one C pass,
        # a third of the search's time.
        return None
    found = (_FORBIDDEN_IN_TEXT if multiline else _FORBIDDEN_IN_LINE).search(value)
    if found is None:
        return None
    char = found.group()
    if "\ud800" <= char <= "\udfff":
        return "a lone surrogate (not Unicode text)"
    if char == "\x00":
        return "a NUL character"
    return f"a control character (U+{ord(char):04X})"
