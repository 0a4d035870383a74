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

With ``--agent-token-ms`` every message also gets an agent reply, the floor of the ``ai``
scenario: the ack carries the message's id, and the sender's socket gets

    {"type":"gen_start","generation_id":G,"reply_to":id}, then one
    {"type":"delta","generation_id":G,"seq":n,"text":...} per chunk, then
    {"type":"gen_end","generation_id":G,"finish_reason":...}

streamed from chatserver's own local provider (the same words at the same pace and the same
shared timer as in the server), with ``async for chunk in provider.stream(...)`` and one
``await ws.send_str()`` per delta: nothing stored, no window, no limits, no metrics.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import uuid
from pathlib import Path
from typing import Any

from aiohttp import WSMsgType, web

ROOMS = web.AppKey("rooms", dict)
REDIS = web.AppKey("redis", object)
AGENT = web.AppKey("agent", object)  # the local provider, when replies are asked for


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
    replies: set[asyncio.Task[None]] = set()
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
                message_id = uuid.uuid4().hex
                await ws.send_str(
                    json.dumps(
                        {
                            "type": "ack",
                            "client_msg_id": frame.get("client_msg_id"),
                            "message_id": message_id,
                            "ref": frame.get("ref"),
                        }
                    )
                )
                data = json.dumps(
                    {
                        "type": "message",
                        "message": {
                            "id": message_id,
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
                if AGENT in app:
                    text = str(frame.get("text"))
                    task = asyncio.create_task(reply(app, ws, conversation_id, message_id, text))
                    replies.add(task)
                    task.add_done_callback(replies.discard)
    finally:
        for task in list(replies):
            task.cancel()
        for conversation_id in joined:
            app[ROOMS].get(conversation_id, set()).discard(ws)
    return ws


async def reply(
    app: web.Application, ws: web.WebSocketResponse, conversation_id: str, asked: str, text: str
) -> None:
    """The agent's answer to ``asked``, streamed to the asker as the provider pushes it."""
    from chatserver.generation.provider import Chunk, ReplyRequest
    from protocol import Message

    generation_id = uuid.uuid4().hex
    question = Message(asked, conversation_id, 1, "user", text, "")
    request = ReplyRequest("general", "local", "", (question,), 0.7, 1024)
    with contextlib.suppress(ConnectionError, RuntimeError):
        await ws.send_str(
            json.dumps({"type": "gen_start", "generation_id": generation_id, "reply_to": asked})
        )
        seq = 0
        reason = "stop"
        async for item in app[AGENT].stream(request):  # type: ignore[attr-defined]
            if isinstance(item, Chunk):
                seq += 1
                await ws.send_str(
                    json.dumps(
                        {
                            "type": "delta",
                            "conversation_id": conversation_id,
                            "generation_id": generation_id,
                            "seq": seq,
                            "text": item.text,
                        }
                    )
                )
            else:
                reason = item.reason
        await ws.send_str(
            json.dumps({"type": "gen_end", "generation_id": generation_id, "finish_reason": reason})
        )


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


def make_app(
    redis_url: str | None, agent_ttft_ms: int | None = None, agent_token_ms: int | None = None
) -> web.Application:
    app = web.Application()
    app[ROOMS] = {}
    if agent_token_ms is not None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
        from chatserver.generation.local import LocalProvider

        app[AGENT] = LocalProvider(agent_ttft_ms or 0, agent_token_ms)
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
    parser.add_argument("--agent-ttft-ms", type=int, help="reply to every message (ai)")
    parser.add_argument("--agent-token-ms", type=int, help="the provider's pace (ai)")
    args = parser.parse_args()
    loop = None
    try:
        import uvloop

        loop = uvloop.new_event_loop()  # like chatserver serve: compare the code, not the loop
    except ImportError:
        pass
    web.run_app(
        make_app(args.redis_url, args.agent_ttft_ms, args.agent_token_ms),
        host=args.host,
        port=args.port,
        print=None,
        access_log=None,
        loop=loop,
    )


if __name__ == "__main__":
    main()
