"""A user's message fanned out by the Redis window's append script itself: an acked question
has reached the other instances, whatever instance dies when (a single Redis and a cluster).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import msgpack
import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from chatserver.fanout.broker.redis import RedisBroker
from chatserver.fanout.envelope import Envelope, appended_head, unpack
from chatserver.fanout.events import Event
from protocol import MessageEvent
from storage.jobs.base import ReplyJob
from storage.jobs.redis import RedisReplyJobs
from storage.outbox.redis import RedisOutbox
from storage.records import MessageDraft
from storage.window.redis import RedisWindow

from ..conftest import eventually

CID = "conv-fanned"
ME, OTHER = "instance-a", "instance-b"


@dataclass
class Instances:
    window: RedisWindow  # instance a's
    outbox: RedisOutbox
    jobs: RedisReplyJobs
    mine: RedisBroker  # instance a's broker: its own publications come back as echoes
    other: RedisBroker
    received: list[Event]  # what instance b's broker delivered


@pytest.fixture(params=["redis", "redis-cluster"])
async def instances(request: pytest.FixtureRequest) -> AsyncIterator[Instances]:
    cluster = request.param == "redis-cluster"
    clients: list[Redis | RedisCluster] = []

    async def client() -> Redis | RedisCluster:
        made: Redis | RedisCluster
        if cluster:
            made = RedisCluster.from_url(request.getfixturevalue("redis_cluster_url"))
            await made.initialize()
        else:
            made = Redis.from_url(request.getfixturevalue("redis_url"))
        clients.append(made)
        return made

    redis = await client()
    window = RedisWindow(
        redis,
        cluster=cluster,
        fanout_head=lambda conv, at, payload: appended_head(ME, at, conv, payload),
    )
    outbox = RedisOutbox(redis, consumer=ME, shards=3 if cluster else 1)
    jobs = RedisReplyJobs(redis, holder=ME, cluster=cluster)
    await window.start()
    await outbox.start()
    await jobs.start()
    await window.rebuild(CID, [], 0)
    received: list[Event] = []
    mine = RedisBroker(await client(), server_id=ME, cluster=cluster)
    other = RedisBroker(await client(), server_id=OTHER, cluster=cluster)
    await mine.start(lambda event: None)
    await other.start(received.append)
    await mine.subscribe(CID)
    await other.subscribe(CID)
    yield Instances(window, outbox, jobs, mine, other, received)
    await mine.close()
    await other.close()
    await jobs.close()
    for made in clients:
        await made.aclose()


def _question(text: str, key: str) -> MessageDraft:
    return MessageDraft(CID, "user", text, user_id="u1", client_msg_id=key)


async def test_the_append_publishes_the_question_as_its_message_frame(
    instances: Instances,
) -> None:
    result = await instances.window.append(
        _question("are you there ✓", "q1"), instances.outbox, jobs=instances.jobs
    )
    assert result.fanned_out and result.job_id is not None
    await eventually(lambda: len(instances.received) == 1)
    [event] = instances.received
    assert event.conversation_id == CID
    assert event.frame == MessageEvent(result.message).to_dict()  # offset and time included
    assert event.published_at > 0
    # the appending instance drops its echo: it delivers to its own members itself
    await eventually(lambda: instances.mine.dropped_echoes == 1)
    # its job is listed in the same step: nothing older holds it back
    turn = await instances.jobs.turn(ReplyJob(result.job_id, result.message, claimed=True))
    assert turn.go


async def test_answers_and_resends_are_not_published(instances: Instances) -> None:
    first = await instances.window.append(_question("one", "q1"), instances.outbox)
    resent = await instances.window.append(_question("one", "q1"), instances.outbox)
    assert resent.duplicate and resent.message.id == first.message.id
    answer = MessageDraft(CID, "assistant", "an answer", client_msg_id="gen-1")
    answered = await instances.window.append(answer, instances.outbox)
    assert not answered.fanned_out  # an answer goes out in its gen_end frame
    second = await instances.window.append(_question("two", "q2"), instances.outbox)
    await eventually(lambda: len(instances.received) == 2)
    offsets = [e.frame["message"]["offset"] for e in instances.received]
    assert offsets == [first.message.offset, second.message.offset]


def test_the_head_takes_a_map_of_any_size() -> None:
    """The script appends two entries to the message's map: its header must count them,
    whatever form it had (fixmap up to 15 entries, map16 beyond)."""
    for size in (4, 13, 14, 40):
        fields = {f"k{i}": i for i in range(size)}
        head = appended_head(ME, 2.5, CID, msgpack.packb(fields))
        tail = msgpack.packb("offset") + msgpack.packb(7)
        tail += msgpack.packb("created_at") + msgpack.packb("2026-12-06T04:30:00.000Z")
        envelope = unpack(head + tail)
        assert isinstance(envelope, Envelope)
        assert (envelope.origin, envelope.published_at, envelope.conversation_id) == (ME, 2.5, CID)
        assert envelope.frame == {
            "type": "message",
            "message": {**fields, "offset": 7, "created_at": "2026-12-06T04:30:00.000Z"},
        }
