"""An instance tells its own published events from their first bytes (echoes are dropped
unread), and never takes its own control messages, or anyone else's events, for them."""

from __future__ import annotations

import msgpack
import pytest

from chatserver.fanout.envelope import (
    CancelReply,
    ControlEnvelope,
    Envelope,
    appended_head,
    own_event_test,
    unpack,
)

CID = "c-1"
FRAME = {"type": "typing", "conversation_id": CID, "user_id": "u"}


@pytest.mark.parametrize("me", ["srv-1", "s" * 31, "instance-" + "x" * 40, "ünïcode-ø"])
def test_own_events_are_told_apart_from_everything_else(me: str) -> None:
    is_own_event = own_event_test(me)
    own = Envelope(me, 1765000000.25, CID, FRAME).pack()
    assert is_own_event(own)
    appended = appended_head(me, 0.0, CID, msgpack.packb({"id": "m"}))
    appended += msgpack.packb("offset") + msgpack.packb(1)
    appended += msgpack.packb("created_at") + msgpack.packb("2026-12-06T12:00:00.000Z")
    assert isinstance(unpack(appended), Envelope) and is_own_event(appended)
    # What must still be read: an own control message, anyone else's event, a prefix
    # of the origin, and what does not decode.
    control = ControlEnvelope(me, CancelReply("g")).pack()
    assert isinstance(unpack(control), ControlEnvelope) and not is_own_event(control)
    assert not is_own_event(Envelope(me + "2", 1.5, CID, FRAME).pack())
    assert not is_own_event(Envelope(me[:-1], 1.5, CID, FRAME).pack())
    assert not is_own_event(Envelope("other", 1.5, CID, FRAME).pack())
    assert not is_own_event(own[:12])
    assert not is_own_event(b"")
