"""The local hub passes each reply's end on once, however often it is announced."""

from __future__ import annotations

from chatserver import keys
from chatserver.fanout.publish import publish
from protocol import GenEnd, Usage

from ..conftest import Harness, MakeHarness


async def test_a_reply_end_announced_twice_reaches_a_member_once(harness: Harness) -> None:
    conv = await harness.conversation("alice")
    alice = await harness.connect("alice")
    await alice.join(conv)
    generation = "00000000-0000-4000-8000-0000000000e1"
    end = GenEnd(conv, generation, "error", Usage(0, 0), None, "its instance stopped")
    # The owner announced it, died, and the instance that claimed it announces it again.
    await publish(harness.app, conv, end.to_dict())
    await publish(harness.app, conv, end.to_dict())
    other = GenEnd(conv, "00000000-0000-4000-8000-0000000000e2", "stop", Usage(0, 0), None, None)
    await publish(harness.app, conv, other.to_dict())
    await alice.expect(GenEnd, lambda e: e.generation_id == other.generation_id)
    await alice.ping()  # after everything delivered before it
    ends = [f for f in alice.pending() if isinstance(f, GenEnd)]
    assert [e.generation_id for e in ends] == [generation]
    assert harness.app[keys.HUB].local_members(conv) == 1


async def test_the_ends_remembered_are_bounded(make_harness: MakeHarness) -> None:
    harness = await make_harness(ended_replies=3)
    conv = await harness.conversation("alice")
    alice = await harness.connect("alice")
    await alice.join(conv)
    hub = harness.app[keys.HUB]
    ids = [f"00000000-0000-4000-8000-00000000000{i}" for i in range(6)]
    for generation in ids:
        end = GenEnd(conv, generation, "stop", Usage(0, 0), None, None)
        await publish(harness.app, conv, end.to_dict())
    await alice.expect(GenEnd, lambda e: e.generation_id == ids[-1])
    assert hub.fill() == {"ended_replies": (3, 3)}
    # The oldest was forgotten: announced again, it goes out again; a recent one does not.
    for generation in (ids[0], ids[-1]):
        end = GenEnd(conv, generation, "stop", Usage(0, 0), None, None)
        await publish(harness.app, conv, end.to_dict())
    await alice.ping()
    # What was not consumed yet: the first five ends, then only the forgotten one again.
    seen = [f.generation_id for f in alice.pending() if isinstance(f, GenEnd)]
    assert seen == [*ids[:-1], ids[0]]
