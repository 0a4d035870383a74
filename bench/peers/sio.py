"""The peer a Python team would pick: python-socketio on aiohttp, AsyncRedisManager between
processes.

    python bench/peers/sio.py --port 9002 [--redis-url redis://127.0.0.1:6379/0]

It speaks the harness's ``socketio`` dialect: the same frames as the bare peer (see
bench/peers/bare.py), each carried as the Socket.IO event ``frame`` (``42["frame",{...}]``).
A join is ``enter_room``; a message is one ``emit("frame", ..., room=C)``: with
``--redis-url`` the AsyncRedisManager publishes it and every process (this one included)
delivers it to its local members of the room.
"""

from __future__ import annotations

import argparse
import uuid
from typing import Any

import socketio  # type: ignore[import-untyped]
from aiohttp import web


def make_app(redis_url: str | None) -> web.Application:
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
            await sio.emit(
                "frame",
                {"type": "ack", "client_msg_id": data.get("client_msg_id"), "ref": data.get("ref")},
                to=sid,
            )
            message = {
                "type": "message",
                "message": {
                    "id": uuid.uuid4().hex,
                    "conversation_id": conversation_id,
                    "user_id": sid,
                    "text": data.get("text"),
                },
            }
            await sio.emit("frame", message, room=conversation_id)

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9002)
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
