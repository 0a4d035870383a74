"""``--redis-info``: what Redis did over the run, from two ``INFO`` samples."""

from __future__ import annotations

import redis

from chatload import redisstat
from tests.services import RedisServer


def test_the_delta_counts_commands_scripts_and_round_trips() -> None:
    server = RedisServer()  # a server of its own: nothing else may talk to it in between
    server.start()
    try:
        client = redis.Redis.from_url(server.url)
        client.ping()
        first = redisstat.sample([server.url])
        pipe = client.pipeline(transaction=False)
        for _ in range(10):
            pipe.get("a")
        pipe.execute()  # 10 commands, 1 round trip
        script = "redis.call('set', KEYS[1], '1'); return redis.call('get', KEYS[1])"
        client.eval(script, 1, "a")  # 3 commands (the script and its 2 calls), 1 round trip
        client.close()  # its end of file is a read too
        last = redisstat.sample([server.url])
    finally:
        server.close()
    found = redisstat.delta(first, last)
    assert found["by_command"] == {"get": 11, "eval": 1, "set": 1}  # the sampling's INFO: out
    assert found["commands"] == 13 and found["scripts"] == 1
    assert found["round_trips"] == 3
    assert found["net_input_bytes"] > 0 and found["cpu_s"] >= 0
    per = redisstat.per(found, 2)
    assert per["commands"] == 6.5 and per["round_trips"] == 1.5
    assert per["by_command"]["get"] == 5.5


def test_an_unreachable_redis_is_reported_unmeasured() -> None:
    nothing = redisstat.sample(["redis://127.0.0.1:1/0"])
    assert nothing == {"redis://127.0.0.1:1/0": None}
    assert redisstat.delta(nothing, nothing)["measured"] == 0
    assert redisstat.per(redisstat.delta(nothing, nothing), 10) == {}
