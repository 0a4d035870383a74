from __future__ import annotations

from protocol import Encoding

from .conftest import Harness


async def test_send_and_reply(harness: Harness, encoding: Encoding) -> None:
    conv = await harness.conversation("alice")
    alice = await harness.connect("alice", encoding)
    joined = await alice.join(conv)
    assert joined.offset == 0
    ack = await alice.send(conv, "hello there")
    assert ack.offset == 1 and not ack.duplicate
    reply = await alice.reply(ack.message_id)
    assert reply.end is not None and reply.end.finish_reason == "stop"
    assert reply.text.startswith("You said: hello there")
    assert reply.end.message is not None and reply.end.message.text == reply.text
