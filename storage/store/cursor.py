"""The opaque keyset cursor of conversation lists: the (updated_at, id) a page ended at."""

from __future__ import annotations

import base64
import binascii
import json

from protocol import text_problem

# Ours are ~100 characters (a timestamp and a UUID); anything much longer is not one of ours.
MAX_CURSOR_CHARS = 512


def encode_cursor(updated_at: str, conversation_id: str) -> str:
    raw = json.dumps([updated_at, conversation_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[str, str]:
    """The (updated_at, id) a cursor points after; ``ValueError`` when it is not one of ours."""
    if len(cursor) > MAX_CURSOR_CHARS:
        raise ValueError("invalid cursor")
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        value = json.loads(raw)
    except (binascii.Error, ValueError, RecursionError) as exc:  # ValueError: JSON, UTF-8
        raise ValueError("invalid cursor") from exc
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not all(isinstance(part, str) and text_problem(part) is None for part in value)
    ):
        raise ValueError("invalid cursor")
    return value[0], value[1]
