"""``text_problem``'s quick pass (``str.isprintable``) never lets a forbidden character by."""

from __future__ import annotations

import pytest

from protocol import text_problem

FORBIDDEN_IN_LINE = {*range(0x20), 0x7F, *range(0xD800, 0xE000)}
FORBIDDEN_IN_TEXT = FORBIDDEN_IN_LINE - {0x09, 0x0A}


@pytest.mark.parametrize("multiline", [False, True])
def test_every_code_point_is_judged_as_the_rule_says(multiline: bool) -> None:
    forbidden = FORBIDDEN_IN_TEXT if multiline else FORBIDDEN_IN_LINE
    wrong = [
        point
        for point in range(0x110000)
        if (text_problem(f"a{chr(point)}b", multiline=multiline) is not None)
        != (point in forbidden)
    ]
    assert wrong == []
