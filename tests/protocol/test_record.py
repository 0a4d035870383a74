"""``record``: slots dataclasses hashed by their fields, frozen for the type checker."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from protocol import Message, Usage
from protocol.record import record


@record
class Point:
    x: int
    y: int = 0


def test_equal_records_are_equal_and_hash_alike() -> None:
    assert Point(1, 2) == Point(1, 2) != Point(2, 1)
    assert hash(Point(1, 2)) == hash(Point(1, 2))
    assert len({Point(1, 2), Point(1, 2), Point(1)}) == 2
    message = Message("m", "c", 1, "user", "hi", "2026-12-07T00:00:00.000Z", usage=Usage(1, 2))
    twin = Message("m", "c", 1, "user", "hi", "2026-12-07T00:00:00.000Z", usage=Usage(1, 2))
    assert {message: 1}[twin] == 1


def test_a_record_has_slots_and_no_instance_dict() -> None:
    assert not hasattr(Point(1), "__dict__")
    assert Point.__slots__ == ("x", "y")  # type: ignore[attr-defined]


def test_the_type_checker_refuses_assigning_a_field(tmp_path: Path) -> None:
    source = tmp_path / "assigns.py"
    source.write_text(
        "from protocol import Message\ndef rename(m: Message) -> None:\n    m.text = 'changed'\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-incremental", "--follow-imports=silent", str(source)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
        timeout=120,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert 'Property "text" defined in "Message" is read-only' in result.stdout
