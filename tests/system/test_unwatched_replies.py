"""Replies no other instance watches: nothing per delta goes to Redis, yet a member who
joins on another instance mid-reply sees every character once, and the owner's death keeps
the text to the last checkpoint."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from redis.asyncio import Redis

from protocol import Delta, GenEnd, GenStart

from .scaleout import connect, instances
from .test_redis_scaleout import LONG, Backend, _conversation, backend  # noqa: F401


async def _calls(redis: Redis, command: str) -> int:
    stats = await redis.info("commandstats")
    entry = stats.get(f"cmdstat_{command}")
    return int(entry["calls"]) if entry else 0


async def test_an_unwatched_reply_sends_nothing_to_redis_per_delta(
    tmp_path: Path, redis_url: str
) -> None:
    redis = Redis.from_url(redis_url)
    with instances(tmp_path, redis_url, count=2, env={"CHAT_LOCAL_TOKEN_MS": "5"}) as (a, _):
        conv = await _conversation(a.url, "alice", [])
        alice = await connect(a, "alice")
        try:
            await alice.join(conv)
            publishes, appends = await _calls(redis, "publish"), await _calls(redis, "append")
            sent = await alice.send(conv, LONG)
            reply = await alice.reply(sent.message_id)
            assert reply.end is not None and reply.end.message is not None
            assert len(reply.deltas) >= 20
            # The user message and gen_end (a few more would be heartbeats' checkpoints);
            # before, one PUBLISH and one APPEND per delta.
            assert await _calls(redis, "publish") - publishes <= 2
            assert await _calls(redis, "append") - appends <= 3
        finally:
            await alice.close()
            await redis.aclose()


async def test_a_member_joining_elsewhere_mid_reply_sees_every_character_once(
    tmp_path: Path,
    backend: Backend,  # noqa: F811
) -> None:
    env = {"CHAT_LOCAL_TOKEN_MS": "15"}
    with instances(tmp_path, backend.url, count=2, env=env, args=backend.args) as (a, b):
        conv = await _conversation(a.url, "alice", ["bob"])
        alice = await connect(a, "alice")
        bob = await connect(b, "bob")
        try:
            await alice.join(conv)  # bob is not in yet: the reply starts unwatched
            await alice.send(conv, LONG)
            start = await alice.expect(GenStart)
            await alice.expect(Delta, lambda d: d.seq == 5)
            joined = await bob.join(conv)
            snapshot = joined.generation
            assert snapshot is not None and snapshot.generation_id == start.generation_id
            assert snapshot.seq >= 5
            rest = await bob.follow(start.generation_id)
            assert rest.end is not None and rest.end.message is not None
            seqs = [d.seq for d in rest.deltas]
            assert seqs == list(range(snapshot.seq + 1, snapshot.seq + 1 + len(seqs)))
            assert snapshot.text + rest.text == rest.end.message.text
        finally:
            await alice.close()
            await bob.close()


async def test_the_owners_death_keeps_the_checkpointed_text(tmp_path: Path, redis_url: str) -> None:
    env = {"CHAT_LOCAL_TOKEN_MS": "40", "CHAT_REPLY_LEASE_S": "1.5"}
    with instances(tmp_path, redis_url, count=2, env=env) as (a, b):
        conv = await _conversation(a.url, "alice", ["bob"])
        alice = await connect(a, "alice")
        bob = await connect(b, "bob")
        try:
            await alice.join(conv)
            sent = await alice.send(conv, LONG)  # unwatched: bob is not in
            start = await alice.expect(GenStart)
            seen = [await alice.expect(Delta, lambda d, n=n: d.seq == n) for n in range(1, 31)]
            a.kill()  # past two checkpoints (every 0.5 s)
            killed_at = time.monotonic()
            await bob.join(conv)
            gen = start.generation_id
            end = await bob.expect(GenEnd, lambda e: e.generation_id == gen, timeout=15)
            assert time.monotonic() - killed_at < 10
            assert end.finish_reason == "error" and end.message is not None
            assert end.message.reply_to == sent.message_id
            # Checkpointed (not empty), and only what the model said, in order.
            text = end.message.text
            assert text and (text.startswith("".join(d.text for d in seen[:5])))
            assert "".join(d.text for d in seen).startswith(text) or text.startswith(
                "".join(d.text for d in seen)
            )
        finally:
            await alice.close()
            await bob.close()


pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


async def _all_calls(redis: Redis) -> dict[str, int]:
    stats = await redis.info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}


# The batch writers' reads of the outbox: they poll while idle, so their count depends on time,
# not on the reply (under load a batch serves many messages: ~1.4 commands per reply).
_POLLING = {"xreadgroup", "xack", "xdel", "xautoclaim", "info"}
# 265 commands per reply at first, 58 after a first round of cuts, 30 after a second; the
# durable reply job then added ~11 (its add in the append, its turn, its end): 41. Its turn's
# mark then became one ZADD, and its end part of the answer's append: 38. Then the jobs
# became keys the append reads with its MGET, the gate's keys joined that MGET, and the
# question's append took the reply's slot and read its context: 30. A question first in
# line then needed no job at all (its slot, taken in the same step, stands for it): 27, 2 of
# them EVALSHA.
MAX_COMMANDS_PER_UNWATCHED_REPLY = 27
# What else may fall inside the measured window, none of it the reply's: each instance's lease
# round every 2 s (its heartbeat, SADD and SET; the sweep, SMEMBERS and an EXISTS for the other
# instance) and the renewal of alice's presence entry every 10 s (a script of 5). The metrics
# sampler, a few commands a second per instance, is put off for the test's length.
_LEASE_ROUND_COMMANDS, _LEASE_ROUND_S = 4, 2.0
_PRESENCE_RENEWAL_COMMANDS, _PRESENCE_RENEWAL_S = 5, 10.0


def _upkeep_within(seconds: float, instances: int) -> int:
    """The most commands the instances' timers can send in a window of ``seconds``: a timer
    of period p fires at most floor(seconds / p) + 1 times in it."""
    rounds = int(seconds // _LEASE_ROUND_S) + 1
    renewals = int(seconds // _PRESENCE_RENEWAL_S) + 1
    return instances * rounds * _LEASE_ROUND_COMMANDS + renewals * _PRESENCE_RENEWAL_COMMANDS


async def test_an_unwatched_reply_costs_few_redis_commands_end_to_end(
    tmp_path: Path, redis_url: str
) -> None:
    """The whole reply: the question's append, the slot, the context, the answer's append
    (which releases the slot), the publishes and the usage, counted by INFO commandstats
    (which counts the commands a script calls too)."""
    redis = Redis.from_url(redis_url)
    # A long lease: no renewal of it falls inside; the sampler's rounds an hour apart.
    env = {
        "CHAT_LOCAL_TOKEN_MS": "5",
        "CHAT_LOCAL_TTFT_MS": "5",
        "CHAT_REPLY_LEASE_S": "60",
        "CHAT_METRICS_SAMPLE_S": "3600",
    }
    with instances(tmp_path, redis_url, count=2, env=env) as (a, _):
        conv = await _conversation(a.url, "alice", [])
        alice = await connect(a, "alice")
        try:
            await alice.join(conv)
            warm = await alice.send(conv, "a first question, so every counter exists")
            assert (await alice.reply(warm.message_id)).end is not None
            started = time.monotonic()
            before = await _all_calls(redis)
            sent = await alice.send(conv, "how many commands does a reply take?")
            reply = await alice.reply(sent.message_id)
            assert reply.end is not None and reply.end.message is not None
            after = await _all_calls(redis)
            upkeep = _upkeep_within(time.monotonic() - started, instances=2)
            spent = {
                name: after[name] - before.get(name, 0)
                for name in after
                if name not in _POLLING and after[name] != before.get(name, 0)
            }
            assert sum(spent.values()) <= MAX_COMMANDS_PER_UNWATCHED_REPLY + upkeep, spent
            assert spent.get("publish", 0) <= 2, spent  # the question and gen_end
        finally:
            await alice.close()
            await redis.aclose()
