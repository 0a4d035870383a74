"""The floor: a bare aiohttp WebSocket broadcast server, optionally on Redis pub/sub.

    python bench/peers/bare.py --port 9001 [--redis-url redis://127.0.0.1:6379/0]

What a Python team writes in an afternoon, and what Python can do here at least: rooms in a
dict, and each message sent with one ``await ws.send_str()`` per recipient. It speaks the
harness's ``peer`` dialect, the JSON frames of protocol v1 that a chat load needs, at ``/ws``:

    server -> {"type":"hello"}                                 on connect (no auth)
    {"type":"join","conversation_id":C,"ref":R}   -> {"type":"joined","conversation_id":C,"ref":R}
    {"type":"send","conversation_id":C,"client_msg_id":M,"text":T,"ref":R}
        -> {"type":"ack","client_msg_id":M,"ref":R} to the sender, then
           {"type":"message","message":{"conversation_id":C,"user_id":...,"text":T,...}}
           to every member of C (the sender too)

With ``--redis-url`` every message goes through Redis pub/sub (one PUBLISH per message, one
subscriber connection per process, pattern ``peer:*``), and each process delivers what it
receives to its local members: two processes on one Redis make a two-instance peer.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import uuid
from typing import Any

from aiohttp import WSMsgType, web

ROOMS = web.AppKey("rooms", dict)
REDIS = web.AppKey("redis", object)


async def deliver(app: web.Application, conversation_id: str, data: str) -> None:
    for ws in list(app[ROOMS].get(conversation_id, ())):
        if not ws.closed:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await ws.send_str(data)


async def websocket(request: web.Request) -> web.WebSocketResponse:
    app = request.app
    ws = web.WebSocketResponse(heartbeat=30, max_msg_size=64 * 1024)
    await ws.prepare(request)
    joined: set[str] = set()
    user = f"u-{uuid.uuid4().hex[:8]}"
    await ws.send_str('{"type":"hello"}')
    try:
        async for msg in ws:
            if msg.type is not WSMsgType.TEXT:
                continue
            frame: dict[str, Any] = json.loads(msg.data)
            kind = frame.get("type")
            conversation_id = str(frame.get("conversation_id"))
            if kind == "join":
                app[ROOMS].setdefault(conversation_id, set()).add(ws)
                joined.add(conversation_id)
                await ws.send_str(
                    json.dumps(
                        {
                            "type": "joined",
                            "conversation_id": conversation_id,
                            "ref": frame.get("ref"),
                        }
                    )
                )
            elif kind == "send":
                await ws.send_str(
                    json.dumps(
                        {
                            "type": "ack",
                            "client_msg_id": frame.get("client_msg_id"),
                            "ref": frame.get("ref"),
                        }
                    )
                )
                data = json.dumps(
                    {
                        "type": "message",
                        "message": {
                            "id": uuid.uuid4().hex,
                            "conversation_id": conversation_id,
                            "user_id": user,
                            "text": frame.get("text"),
                        },
                    },
                    separators=(",", ":"),
                )
                redis = app.get(REDIS)
                if redis is not None:
                    await redis.publish(f"peer:{conversation_id}", data)  # type: ignore[attr-defined]
                else:
                    await deliver(app, conversation_id, data)
    finally:
        for conversation_id in joined:
            app[ROOMS].get(conversation_id, set()).discard(ws)
    return ws


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def subscriber(app: web.Application, url: str) -> None:
    from redis.asyncio import Redis

    client = Redis.from_url(url)
    pubsub = client.pubsub()
    await pubsub.psubscribe("peer:*")
    async for item in pubsub.listen():
        if item["type"] == "pmessage":
            channel = item["channel"].decode()
            await deliver(app, channel.split(":", 1)[1], item["data"].decode())


def make_app(redis_url: str | None) -> web.Application:
    app = web.Application()
    app[ROOMS] = {}
    app.router.add_get("/ws", websocket)
    app.router.add_get("/healthz", healthz)

    async def with_redis(app: web.Application) -> Any:
        if redis_url is None:
            yield
            return
        from redis.asyncio import Redis

        app[REDIS] = Redis.from_url(redis_url)
        task = asyncio.create_task(subscriber(app, redis_url))
        yield
        task.cancel()

    app.cleanup_ctx.append(with_redis)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9001)
    parser.add_argument("--redis-url")
    args = parser.parse_args()
    loop = None
    try:
        import uvloop

        loop = uvloop.new_event_loop()  # like chatserver serve: compare the code, not the loop
    except ImportError:
        pass
    web.run_app(
        make_app(args.redis_url),
        host=args.host,
        port=args.port,
        print=None,
        access_log=None,
        loop=loop,
    )


if __name__ == "__main__":
    main()
