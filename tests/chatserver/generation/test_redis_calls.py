"""The resume buffer's script calls on a cluster: calls on one conversation's keys run in
their order (a resync's text before the delta after it), other conversations' alongside."""

from __future__ import annotations

import uuid

from redis.asyncio.cluster import RedisCluster

from chatserver.generation.redis_calls import script_calls

# Like record.lua: applied only past what is recorded, so an overtaken call is lost.
_UP_TO = """
if tonumber(redis.call('GET', KEYS[1]) or '0') < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[1])
  redis.call('APPEND', KEYS[2], ARGV[1] .. ' ')
  return 1
end
return 0
"""


async def test_calls_on_one_conversation_run_in_order_on_a_cluster(
    redis_cluster_url: str,
) -> None:
    cluster = RedisCluster.from_url(redis_cluster_url)
    await cluster.initialize()
    try:
        script = cluster.register_script(_UP_TO)
        convs = [f"{{{uuid.uuid4()}}}" for _ in range(8)]
        calls = [
            (script, [f"{conv}:seq", f"{conv}:text"], [seq])
            for seq in range(1, 41)
            for conv in convs
        ]
        assert await script_calls(cluster, calls) == [1] * len(calls)
        for conv in convs:
            assert (
                await cluster.get(f"{conv}:text")
                == " ".join(map(str, range(1, 41))).encode() + b" "
            )
    finally:
        await cluster.aclose()
