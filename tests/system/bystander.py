"""A bystander: one authenticated client pinging a server at a steady pace, in its own process.

    python -m tests.system.bystander WS_URL TOKEN [INTERVAL_MS]

Prints ``ready`` once connected (after a first ping), then pings every INTERVAL_MS (10 by
default) and records each round trip, until a line arrives on stdin; then prints the round
trips in milliseconds as one JSON list and exits. In a process of its own, so that what the
test process does meanwhile (generating and sending a fuzz) does not delay its pings: the
round trips are the server's.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from chatclient.client import ChatClient


async def main(url: str, token: str, interval_s: float) -> None:
    loop = asyncio.get_running_loop()
    client = await ChatClient.connect(url, token)
    stop = loop.run_in_executor(None, sys.stdin.readline)
    await client.ping()
    print("ready", flush=True)
    rtts: list[float] = []
    next_at = loop.time()
    while not stop.done():
        started = time.perf_counter()
        await client.ping()
        rtts.append((time.perf_counter() - started) * 1000)
        next_at += interval_s
        # A steady pace, not back to back: a slow answer is not followed by a burst.
        await asyncio.wait([stop], timeout=max(0.0, next_at - loop.time()))
        next_at = max(next_at, loop.time())
    await client.close()
    print(json.dumps(rtts), flush=True)


if __name__ == "__main__":
    interval_ms = float(sys.argv[3]) if len(sys.argv) > 3 else 10.0
    asyncio.run(main(sys.argv[1], sys.argv[2], interval_ms / 1000))
