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


async def test_embedded_restart_answers_the_queued_questions(tmp_path: Path) -> None:
    env = {
        "CHAT_JWT_SECRET": SECRET,
        "CHAT_LOCAL_TTFT_MS": "5",
        "CHAT_LOCAL_TOKEN_MS": "100",  # the first reply outlives the shutdown grace
        "CHAT_SHUTDOWN_GRACE_S": "0.5",
        "CHAT_LOG_LEVEL": "warning",
    }
    with ServerProc(tmp_path / "alone", env=env) as server:
        conv = await _conversation(server.url, "alice", [])
        alice = await connect(server, "alice")
        await alice.join(conv)
        asked = [(await alice.send(conv, t)).message_id for t in (LONG, "two", "three")]
        await alice.expect(GenStart)
        server.restart()  # SIGTERM: the first reply is cut at the grace, two wait
        await alice.close()
        alice = await connect(server, "alice")
        try:
            joined = await alice.join(conv)
            answers = {m.reply_to: m for m in joined.messages if m.role == "assistant"}
            deadline = time.monotonic() + 10
            while set(answers) != set(asked) and time.monotonic() < deadline:
                end = await alice.expect(GenEnd, timeout=max(0.1, deadline - time.monotonic()))
                assert end.message is not None and end.message.reply_to not in answers
                answers[end.message.reply_to] = end.message
            assert set(answers) == set(asked), "a queued question was not answered"
            assert answers[asked[0]].finish_reason == "error"  # cut at the grace: kept
            assert [answers[q].finish_reason for q in asked[1:]] == ["stop", "stop"]
            # in the conversation's order, once each
            final = await alice.join(conv)
            replies = [m.reply_to for m in final.messages if m.role == "assistant"]
            assert replies == asked
        finally:
            await alice.close()
