"""Which instance runs a reply, from its generation id alone: for a cancel sent to another
instance than the reply's owner (rare, so no key per reply is kept for it)."""

from __future__ import annotations

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from storage.redis_codec import as_str
from storage.redis_keys import conversation_keys, instance_replies_key, instances_key

from .buffer import ReplyOwner


def _glob_escape(text: str) -> str:
    """``text`` matched literally by a Redis glob pattern."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


async def _conversation_of(
    redis: Redis | RedisCluster, prefix: str, generation_id: str
) -> str | None:
    """Which conversation a running reply is in: its entry in its owner's list of running
    replies, found by a scan of every instance's list."""
    pattern = f"*\t{_glob_escape(generation_id)}"
    for server_id in [as_str(m) for m in await redis.smembers(instances_key(prefix))]:
        key = instance_replies_key(prefix, server_id)
        async for member in redis.sscan_iter(key, match=pattern, count=1000):
            return as_str(member).partition("\t")[0]
    return None


async def find_owner(
    redis: Redis | RedisCluster, prefix: str, generation_id: str
) -> ReplyOwner | None:
    """The running reply ``generation_id`` and its owner; None when it is not running."""
    conversation_id = await _conversation_of(redis, prefix, generation_id)
    if conversation_id is None:
        return None
    fields = await redis.hgetall(conversation_keys(prefix, conversation_id).reply)
    data = {as_str(k): as_str(v) for k, v in fields.items()}
    if data.get("gid") != generation_id:
        return None  # ended (its list entry goes with the next heartbeat) or claimed
    return ReplyOwner(
        conversation_id,
        generation_id,
        data["owner"],
        data["agent"],
        data["model"],
        data["reply_to"],
    )
