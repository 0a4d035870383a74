"""Decoding the messages this system wrote to Redis: the quick ways give what the validating
one gives, and whatever is not a well-typed message still takes the validating way."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from protocol import Message, ProtocolError, Usage
from storage.records import MessageDraft
from storage.redis_codec import (
    decode_message,
    decode_stored,
    decode_trusted,
    draft_payload,
    fast_timestamp,
    message_payload,
)

CREATED_MS = 1_796_610_506_123

ANSWER = MessageDraft(
    conversation_id="c-1",
    role="assistant",
    text="an answer\twith a tab",
    agent_id="general",
    finish_reason="stop",
    usage=Usage(12, 34),
    model="local",
    reply_to="m-0",
)
QUESTION = MessageDraft(
    conversation_id="c-1", role="user", text="hi", user_id="u", client_msg_id="k"
)


@pytest.mark.parametrize("draft", [QUESTION, ANSWER])
def test_the_quick_decodes_give_what_validation_gives(draft: MessageDraft) -> None:
    payload = draft_payload("m-1", draft)
    expected = decode_message(payload, 7, CREATED_MS)
    assert expected.created_at == fast_timestamp(CREATED_MS)
    assert decode_trusted(payload, 7, CREATED_MS) == expected
    assert decode_stored(payload, 7, CREATED_MS) == expected


def test_a_complete_payload_keeps_its_own_offset_and_time() -> None:
    message = Message("m-2", "c-1", 9, "user", "hello", "2026-12-07T02:00:00.000Z", user_id="u")
    assert decode_stored(message_payload(message), None, None) == message


@pytest.mark.parametrize(
    "change",
    [
        {"id": 5},
        {"text": b"bytes, not text"},
        {"role": "owner"},
        {"user_id": ["u"]},
        {"finish_reason": "bored"},
        {"usage": {"input_tokens": -1, "output_tokens": 2}},
        {"usage": {"input_tokens": "1", "output_tokens": 2}},
    ],
)
def test_a_message_of_the_wrong_types_is_refused_as_validation_refuses_it(
    change: dict[str, Any],
) -> None:
    fields = {"id": "m-3", "conversation_id": "c-1", "role": "user", "text": "x", **change}
    payload = msgpack.packb(fields)
    with pytest.raises(ProtocolError):
        decode_message(payload, 3, CREATED_MS)
    with pytest.raises(ProtocolError):
        decode_stored(payload, 3, CREATED_MS)


@pytest.mark.parametrize("payload", [b"\xc1 not msgpack", msgpack.packb([1, 2, 3])])
def test_what_is_no_message_at_all_raises(payload: bytes) -> None:
    with pytest.raises(ValueError):
        decode_stored(payload, 3, CREATED_MS)


def test_an_offset_below_one_is_refused() -> None:
    payload = draft_payload("m-4", QUESTION)
    with pytest.raises(ProtocolError):
        decode_stored(payload, 0, CREATED_MS)
