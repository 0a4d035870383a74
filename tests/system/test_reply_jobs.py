"""Every acknowledged question gets exactly one answer, whatever instance dies when (real
processes on one Redis; the local model answers)."""

from __future__ import annotations

import time
from pathlib import Path

from chatclient.client import ChatClient
from protocol import GenEnd, GenStart, MessageEvent, Send
from tests.serverproc import ServerProc

from .scaleout import SECRET, connect, instances
from .test_redis_scaleout import LONG, _conversation

LEASE_S = 2.0


async def _ends_by_question(bob: ChatClient, questions: set[str], timeout: float) -> dict[str, int]:
    """Count the gen_end frames bob gets per question until each has one (or the timeout);
    then the frames already there, so a second answer would be counted too."""
    ends: dict[str, int] = {}
    deadline = time.monotonic() + timeout
    while set(ends) != questions and time.monotonic() < deadline:
        end = await bob.expect(GenEnd, timeout=max(0.1, deadline - time.monotonic()))
        assert end.message is not None, end.error
        reply_to = end.message.reply_to or ""
        ends[reply_to] = ends.get(reply_to, 0) + 1
    return ends


async def test_kill_9_with_queued_replies_answers_every_question_once(
    tmp_path: Path, redis_url: str
) -> None:
    env = {"CHAT_LOCAL_TOKEN_MS": "40", "CHAT_REPLY_LEASE_S": str(LEASE_S)}
    with instances(tmp_path, redis_url, 2, env=env) as (a, b):
        convs = [await _conversation(b.url, "alice", ["bob"]) for _ in range(4)]
        alice = await connect(a, "alice")
        bob = await connect(b, "bob")
        try:
            questions: set[str] = set()
            for conv in convs:
                await alice.join(conv)
                await bob.join(conv)
                for text in (LONG, "second question", "third question"):
                    questions.add((await alice.send(conv, text)).message_id)
            for _ in convs:  # each conversation's first reply streams, two wait behind it
                await bob.expect(GenStart)
            a.kill()
            killed = time.monotonic()
            ends = await _ends_by_question(bob, questions, LEASE_S + 5 + 5)
            assert set(ends) == questions, f"{len(questions) - len(ends)} questions unanswered"
            # the cut replies end first (sweep), the queued ones are claimed after the lease
            assert time.monotonic() - killed < LEASE_S + 5 + 5
            # exactly one answer each, in the conversations' order, stored once
            for conv in convs:
                joined = await bob.join(conv)
                replies = [m for m in joined.messages if m.role == "assistant"]
                asked = [m.id for m in joined.messages if m.role == "user"]
                assert [m.reply_to for m in replies] == asked
            assert all(count == 1 for count in ends.values()), ends
            assert not [f for f in bob.pending() if isinstance(f, GenEnd)]
        finally:
            await alice.close()
            await bob.close()


async def test_kill_between_the_append_and_the_fanout_announces_and_answers(
    tmp_path: Path, redis_url: str
) -> None:
    env = {"CHAT_REPLY_LEASE_S": str(LEASE_S)}
    with instances(tmp_path, redis_url, 1, env=env) as (b,):
        crashing = ServerProc(
            tmp_path / "crashing",
            env={
                "CHAT_JWT_SECRET": SECRET,
                "CHAT_SERVER_ID": "crashing",
                "CHAT_LOCAL_TTFT_MS": "5",
                "CHAT_LOCAL_TOKEN_MS": "5",
                "CHAT_LOG_LEVEL": "warning",
                "CHAT_TEST_CRASH_AFTER_APPEND": "yes",
                **env,
            },
            args=["--redis-url", redis_url],
            sqlite_path=tmp_path / "shared.sqlite3",
        ).start()
        conv = await _conversation(b.url, "alice", ["bob"])
        alice = await connect(crashing, "alice")
        bob = await connect(b, "bob")
        try:
            await bob.join(conv)
            await alice.join(conv)
            await alice.send_frame(Send(conv, "k1", "are you there"))
            assert crashing.proc is not None
            crashing.proc.wait(timeout=10)  # it died after the append, before the fan-out
            died = time.monotonic()
            # the instance that claims the job announces the question, then answers it
            event = await bob.expect(MessageEvent, timeout=LEASE_S + 5)
            assert event.message.text == "are you there"
            end = await bob.expect(GenEnd, timeout=LEASE_S + 5)
            assert time.monotonic() - died < LEASE_S + 5
            assert end.message is not None and end.message.reply_to == event.message.id
            assert end.finish_reason == "stop"
            # the sender, resending on the live instance, gets its duplicate ack: no copy
            alice2 = await connect(b, "alice")
            ack = await alice2.send(conv, "are you there", "k1")
            assert ack.duplicate and ack.message_id == event.message.id
            await alice2.close()
            assert not [f for f in bob.pending() if isinstance(f, (MessageEvent, GenEnd))]
        finally:
            await alice.close()
            await bob.close()
            crashing.close()
