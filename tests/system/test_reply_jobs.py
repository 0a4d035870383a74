"""Every acknowledged question gets exactly one answer, whatever instance dies when (real
processes on one Redis; the local model answers)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from chatclient.client import ChatClient
from protocol import Delta, GenEnd, GenStart, MessageEvent, Send, ServerFrame
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
            streaming = []  # each conversation's first reply streams, two wait behind it
            for _ in convs:
                start = await bob.expect(GenStart)
                streaming.append(start.reply_to)
                # Some text recorded (watched: before bob got it): it is cut off, not run again.
                gid = start.generation_id
                await bob.expect(Delta, lambda d, gid=gid: d.generation_id == gid)
            a.kill()
            killed = time.monotonic()
            ends = await _ends_by_question(bob, questions, LEASE_S + 5)
            assert set(ends) == questions, f"{len(questions) - len(ends)} questions unanswered"
            # Each question went out with its append (the window's script published it):
            # none lost with the instance that acked it, none fanned out again by a claimer.
            fanned = [f.message.id for f in bob.pending() if isinstance(f, MessageEvent)]
            assert sorted(fanned) == sorted(questions)
            assert set(streaming) <= questions
            # the cut replies end first (sweep), the queued ones are claimed after the lease
            assert time.monotonic() - killed < LEASE_S + 5
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


async def test_kill_right_after_the_append_fans_out_once_and_answers(
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
            crashing.proc.wait(timeout=10)  # it died right after the append
            died = time.monotonic()
            # the append itself fanned the question out; the instance that claims the job
            # answers it (and does not announce it again)
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


async def _record_until_answered(
    client: ChatClient, questions: int, timeout: float
) -> list[ServerFrame]:
    """Every frame the client gets until it has seen ``questions`` gen_end frames."""
    frames: list[ServerFrame] = []
    deadline = time.monotonic() + timeout
    ends = 0
    while ends < questions:
        frame = await client.next_frame(timeout=max(0.1, deadline - time.monotonic()))
        frames.append(frame)
        ends += isinstance(frame, GenEnd)
    return frames


def _check_order(frames: list[ServerFrame], conv: str) -> list[str]:
    """One conversation's frames as a watcher saw them: each question arrives once, each
    reply starts once and ends with its answer, and the replies start in offset order.
    Returns the questions in that order. (Frames of two publishers may interleave either
    way at a watcher: the next reply's gen_start, published here, can overtake the last
    one's gen_end from another instance; docs/protocol.md.)"""
    asked: list[MessageEvent] = []
    started: list[str] = []
    ended: list[str] = []
    for frame in frames:
        if isinstance(frame, MessageEvent):
            if frame.message.conversation_id == conv and frame.message.role == "user":
                asked.append(frame)
        elif isinstance(frame, GenStart) and frame.conversation_id == conv:
            started.append(frame.reply_to)
        elif isinstance(frame, GenEnd) and frame.conversation_id == conv:
            assert frame.finish_reason == "stop", frame.error
            assert frame.message is not None
            ended.append(frame.message.reply_to or "")
    asked.sort(key=lambda event: event.message.offset)
    offsets = [event.message.offset for event in asked]
    assert len(set(offsets)) == len(offsets), f"a question arrived twice: {offsets}"
    ids = [event.message.id for event in asked]
    assert started == ids, "the replies did not follow the conversation's order"
    assert sorted(ended) == sorted(ids), "a reply did not end once"
    return ids


async def test_order_across_instances_under_load(tmp_path: Path, redis_url: str) -> None:
    """Two askers on two instances send into the same conversations at once; watchers on both
    instances see each conversation's replies start in its order and end once, and the store
    holds the replies in that order."""
    per_sender = 4
    env = {"CHAT_MAX_QUEUED_REPLIES": str(2 * per_sender)}
    with instances(tmp_path, redis_url, 2, env=env) as (a, b):
        convs = [await _conversation(a.url, "alice", ["carol", "bob", "erin"]) for _ in range(6)]
        alice, carol = await connect(a, "alice"), await connect(b, "carol")
        watchers = [await connect(a, "bob"), await connect(b, "erin")]
        clients = [alice, carol, *watchers]
        try:
            for conv in convs:
                for client in clients:
                    await client.join(conv)

            async def ask(client: ChatClient, who: str) -> None:
                for round_ in range(per_sender):
                    for conv in convs:
                        await client.send(conv, f"q {round_}", f"{who}-{conv}-{round_}")

            total = len(convs) * 2 * per_sender
            seen = asyncio.gather(*(_record_until_answered(w, total, 60) for w in watchers))
            await asyncio.gather(ask(alice, "alice"), ask(carol, "carol"))
            by_watcher = await seen
            for conv in convs:
                orders = [_check_order(frames, conv) for frames in by_watcher]
                assert orders[0] == orders[1], "the two instances saw different orders"
                assert len(orders[0]) == 2 * per_sender
                joined = await watchers[0].join(conv)
                asked = [m.id for m in joined.messages if m.role == "user"]
                replies = [m.reply_to for m in joined.messages if m.role == "assistant"]
                assert asked == orders[0] and replies == asked
        finally:
            for client in clients:
                await client.close()
