"""The peer a Python team would pick: python-socketio on aiohttp, AsyncRedisManager between
processes.

    python bench/peers/sio.py --port 9002 [--redis-url redis://127.0.0.1:6379/0]
                              [--agent-ttft-ms 200 --agent-token-ms 15]

It speaks the harness's ``socketio`` dialect: the same frames as the bare peer (see
bench/peers/bare.py), each carried as the Socket.IO event ``frame`` (``42["frame",{...}]``).
A join is ``enter_room``; a message is one ``emit("frame", ..., room=C)``: with
``--redis-url`` the AsyncRedisManager publishes it and every process (this one included)
delivers it to its local members of the room.

With ``--agent-token-ms`` every message also gets an agent reply, the way Open WebUI streams
one: the ack carries the message's id, then ``gen_start``, one ``delta`` per chunk and
``gen_end`` (the frames of bench/peers/bare.py) are each one ``emit("frame", ..., room=C)``
to the conversation's room, from a task per reply that runs ``async for chunk in
provider.stream(...)`` over chatserver's own local provider (the same words at the same pace
and on the same shared timer as the server and the bare peer). With ``--redis-url`` each of
those emits is delivered to the local members and published once on Redis, where every other
process reads it and delivers it to its own members of the room.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import uuid
from pathlib import Path
from typing import Any

import socketio  # type: ignore[import-untyped]
from aiohttp import web


def make_app(
    redis_url: str | None, agent_ttft_ms: int | None = None, agent_token_ms: int | None = None
) -> web.Application:
    agent: Any = None
    if agent_token_ms is not None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
        from chatserver.generation.local import LocalProvider

        agent = LocalProvider(agent_ttft_ms or 0, agent_token_ms)
    replies: set[asyncio.Task[None]] = set()
    manager = socketio.AsyncRedisManager(redis_url) if redis_url else None
    sio = socketio.AsyncServer(
        async_mode="aiohttp", client_manager=manager, cors_allowed_origins="*"
    )
    app = web.Application()
    sio.attach(app)

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app.router.add_get("/healthz", healthz)

    @sio.event  # type: ignore[untyped-decorator]
    async def connect(sid: str, environ: dict[str, Any]) -> None:
        await sio.emit("frame", {"type": "hello"}, to=sid)

    @sio.on("frame")  # type: ignore[untyped-decorator]
    async def frame(sid: str, data: dict[str, Any]) -> None:
        kind = data.get("type")
        conversation_id = str(data.get("conversation_id"))
        if kind == "join":
            await sio.enter_room(sid, conversation_id)
            await sio.emit(
                "frame",
                {"type": "joined", "conversation_id": conversation_id, "ref": data.get("ref")},
                to=sid,
            )
        elif kind == "send":
            message_id = uuid.uuid4().hex
            ack = {
                "type": "ack",
                "client_msg_id": data.get("client_msg_id"),
                "ref": data.get("ref"),
            }
            if agent is not None:
                ack["message_id"] = message_id
            await sio.emit("frame", ack, to=sid)
            message = {
                "type": "message",
                "message": {
                    "id": message_id,
                    "conversation_id": conversation_id,
                    "user_id": sid,
                    "text": data.get("text"),
                },
            }
            await sio.emit("frame", message, room=conversation_id)
            if agent is not None:
                task = asyncio.create_task(
                    reply(conversation_id, message_id, str(data.get("text")))
                )
                replies.add(task)
                task.add_done_callback(replies.discard)

    async def reply(conversation_id: str, asked: str, text: str) -> None:
        """The agent's answer to ``asked``: every frame of it one emit to the room."""
        from chatserver.generation.provider import Chunk, ReplyRequest
        from protocol import Message

        generation_id = uuid.uuid4().hex
        question = Message(asked, conversation_id, 1, "user", text, "")
        request = ReplyRequest("general", "local", "", (question,), 0.7, 1024)
        room = conversation_id
        start = {"type": "gen_start", "generation_id": generation_id, "reply_to": asked}
        await sio.emit("frame", start, room=room)
        seq = 0
        reason = "stop"
        async for item in agent.stream(request):
            if isinstance(item, Chunk):
                seq += 1
                delta = {
                    "type": "delta",
                    "conversation_id": conversation_id,
                    "generation_id": generation_id,
                    "seq": seq,
                    "text": item.text,
                }
                await sio.emit("frame", delta, room=room)
            else:
                reason = item.reason
        end = {"type": "gen_end", "generation_id": generation_id, "finish_reason": reason}
        await sio.emit("frame", end, room=room)

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9002)
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
