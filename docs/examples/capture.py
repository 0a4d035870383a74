"""Capture a realistic session with the server, frame by frame, for docs/protocol.md.

Run from the repository root:

    .venv/bin/python docs/examples/capture.py

It starts the app in-process (embedded mode: in-memory broker, window and outbox, a SQLite
file in a temporary directory, the local echo model), talks to it with raw WebSocket frames
and plain HTTP requests, and prints every frame as JSON. A second in-process server, with a
configured JWT secret (and a previous one), an Origin allow-list and small free-tier limits,
shows what dev auth mode does not: origins, token rotation and leeway, connection caps, rate
limits, daily quotas and the admin route.

    alice -> {...}      a frame alice sends
    alice <- {...}      a frame alice receives
    GET /path           a REST request, then `<- status body`

Ids and times differ from run to run; everything else is what the server really sends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import tempfile
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
from aiohttp import WSMsgType, web

from chatserver.app import create_app
from chatserver.auth import Authenticator
from chatserver.settings import Settings

TIMEOUT_S = 10.0


def show(line: str) -> None:
    print(line, flush=True)


def section(title: str) -> None:
    show("")
    show(f"### {title}")


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(", ", ": "))


class Peer:
    """One raw WebSocket: every frame sent and received is printed."""

    def __init__(self, name: str, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.name = name
        self.ws = ws

    async def send(self, frame: dict[str, Any], shown: dict[str, Any] | None = None) -> None:
        """Send ``frame``; print ``shown`` instead when given (to hide a token)."""
        text = json.dumps(frame, separators=(",", ":"))
        show(f"{self.name} -> {dumps(shown if shown is not None else frame)}")
        await self.ws.send_str(text)

    async def send_raw(self, text: str) -> None:
        show(f"{self.name} -> {text}    (raw text frame)")
        await self.ws.send_str(text)

    async def recv(self) -> dict[str, Any]:
        msg = await self.ws.receive(timeout=TIMEOUT_S)
        if msg.type is WSMsgType.TEXT:
            frame: dict[str, Any] = json.loads(msg.data)
            show(f"{self.name} <- {dumps(frame)}")
            return frame
        if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
            show(f"{self.name} <- [close {self.ws.close_code}]")
            return {"type": "<close>", "code": self.ws.close_code}
        raise RuntimeError(f"unexpected WebSocket message {msg!r}")

    async def until(self, kind: str, **match: Any) -> dict[str, Any]:
        """Print frames until one of ``kind`` (with the given fields) arrives."""
        while True:
            frame = await self.recv()
            if frame["type"] == "<close>":
                raise RuntimeError(f"{self.name}: closed while waiting for {kind}")
            if frame["type"] == kind and all(frame.get(k) == v for k, v in match.items()):
                return frame

    async def close(self) -> None:
        await self.ws.close()
        show(f"{self.name}    [closes the socket, code {self.ws.close_code}]")


class Rest:
    def __init__(self, http: aiohttp.ClientSession, base: str) -> None:
        self.http = http
        self.base = base

    async def call(
        self,
        method: str,
        path: str,
        token: str | None = None,
        body: Any = None,
        *,
        raw_body: str | None = None,
        quiet: bool = False,
        show_headers: tuple[str, ...] = (),
    ) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        data: str | None = None
        if body is not None:
            data = json.dumps(body)
            headers["Content-Type"] = "application/json"
        elif raw_body is not None:
            data = raw_body
        line = f"{method} {path}"
        if token:
            line += "    (Authorization: Bearer <token>)"
        if data is not None:
            line += f"\n   body: {data}"
        show(line)
        async with self.http.request(method, self.base + path, data=data, headers=headers) as r:
            text = await r.text()
            try:
                payload: Any = json.loads(text)
            except ValueError:
                payload = text
            for name in show_headers:
                show(f"   {name}: {r.headers.get(name)}")
            if not quiet:
                shown = dumps(payload) if not isinstance(payload, str) else payload.rstrip()
                show(f"<- {r.status} {shown}")
            return r.status, payload


async def session(base: str) -> None:
    ws_url = base.replace("http://", "ws://") + "/ws"
    async with aiohttp.ClientSession() as http:
        rest = Rest(http, base)

        section("REST: dev tokens (dev auth mode only)")
        _, body = await rest.call("POST", "/api/dev/token", body={"user_id": "alice"})
        alice_token = body["token"]
        _, body = await rest.call("POST", "/api/dev/token", body={"user_id": "bob", "tier": "pro"})
        bob_token = body["token"]
        _, body = await rest.call("POST", "/api/dev/token", body={"user_id": "mallory"})
        mallory_token = body["token"]

        section("REST: agents")
        await rest.call("GET", "/api/agents", alice_token, show_headers=("Cache-Control",))

        section("REST: create a conversation (alice owns it, bob is a member)")
        _, conv = await rest.call(
            "POST",
            "/api/conversations",
            alice_token,
            {"agent_id": "general", "title": "Trip planning", "members": ["bob"]},
        )
        cid = conv["id"]

        section("REST: errors")
        await rest.call("GET", "/api/agents")
        await rest.call("POST", "/api/conversations", alice_token, {"agent_id": "nobody"})
        await rest.call("POST", "/api/conversations", alice_token, raw_body="not json")
        await rest.call("GET", "/api/conversations?limit=500", alice_token)
        await rest.call("GET", f"/api/conversations/{cid}/messages", mallory_token)
        await rest.call("GET", f"/api/conversations/{uuid.uuid4()}/messages", alice_token)
        await rest.call("GET", "/api/conversations/trip-1/messages", alice_token)
        big_body = json.dumps({"agent_id": "general", "title": "x" * 300_000})
        show("POST /api/conversations    (Authorization: Bearer <token>)")
        show(f"   body: <{len(big_body)} bytes>")
        async with http.post(
            base + "/api/conversations",
            data=big_body,
            headers={"Authorization": f"Bearer {alice_token}", "Content-Type": "application/json"},
        ) as r:
            show(f"<- {r.status} {dumps(await r.json())}")

        section("WebSocket: an unsupported subprotocol is refused at the handshake")
        async with http.get(
            base + "/ws",
            headers={
                "Connection": "Upgrade",
                "Upgrade": "websocket",
                "Sec-WebSocket-Version": "13",
                "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                "Sec-WebSocket-Protocol": "chat.v2.json",
            },
        ) as r:
            show("GET /ws    (Sec-WebSocket-Protocol: chat.v2.json)")
            show(f"<- {r.status} {(await r.text()).rstrip()}")

        section("WebSocket: a bad token (auth frame) gets an error, then close 4401")
        ws = await http.ws_connect(ws_url, protocols=("chat.v1.json",))
        eve = Peer("eve", ws)
        await eve.send({"type": "auth", "token": "not-a-jwt", "ref": "a1"})
        await eve.recv()
        await eve.recv()

        section("WebSocket: alice authenticates with the Authorization header")
        ws = await http.ws_connect(
            ws_url,
            protocols=("chat.v1.json",),
            headers={"Authorization": f"Bearer {alice_token}"},
        )
        show(f"alice    [connected, subprotocol {ws.protocol}, Authorization: Bearer <token>]")
        alice = Peer("alice", ws)
        await alice.until("hello")

        section("WebSocket: bob authenticates with an auth frame (as browsers do)")
        ws = await http.ws_connect(ws_url, protocols=("chat.v1.json",))
        bob = Peer("bob", ws)
        await bob.send({"type": "auth", "token": bob_token}, {"type": "auth", "token": "<jwt>"})
        await bob.until("hello")

        section("join (fresh: no since)")
        await alice.send({"type": "join", "conversation_id": cid, "ref": "j1"})
        await alice.until("joined")
        await bob.send({"type": "join", "conversation_id": cid, "ref": "j2"})
        epoch = (await bob.until("joined"))["epoch"]

        section("presence: after joined, then to the others when a member comes or goes")
        await bob.until("presence")
        await alice.until("presence", online=["alice", "bob"])

        section("send -> ack, message to every member, then the agent's reply stream")
        await alice.send(
            {
                "type": "send",
                "conversation_id": cid,
                "client_msg_id": "c-1",
                "text": "Where should we go in May?",
                "ref": "s1",
            }
        )
        await alice.until("gen_end")
        show("bob    [receives the same message, gen_start, delta and gen_end frames]")
        end = await quiet(bob, "gen_end")
        bob_since = {"offset": end["message"]["offset"], "epoch": epoch}

        section("send again with the same client_msg_id: acked as a duplicate, nothing appended")
        await alice.send(
            {
                "type": "send",
                "conversation_id": cid,
                "client_msg_id": "c-1",
                "text": "Where should we go in May?",
                "ref": "s2",
            }
        )
        await alice.until("ack")

        section("typing: relayed to the other members, not echoed to the sender")
        await bob.send({"type": "typing", "conversation_id": cid})
        await alice.until("typing")

        section("ping")
        await alice.send({"type": "ping", "ts": 1732740000123, "ref": "p1"})
        await alice.until("pong")

        section("history")
        await alice.send({"type": "history", "conversation_id": cid, "limit": 1, "ref": "h1"})
        page = await alice.until("history")
        await alice.send(
            {
                "type": "history",
                "conversation_id": cid,
                "before": page["messages"][0]["offset"],
                "limit": 50,
                "ref": "h2",
            }
        )
        await alice.until("history")

        section("bad frames: an error each, the connection stays open")
        await alice.send({"type": "send", "conversation_id": cid, "text": "hi", "ref": "b1"})
        await alice.recv()
        await alice.send({"type": "shout", "ref": "b2"})
        await alice.recv()
        await alice.send_raw("{not json")
        await alice.recv()
        big = {"type": "send", "conversation_id": cid, "client_msg_id": "c-big", "ref": "b3"}
        await alice.send({**big, "text": "x" * 8001}, {**big, "text": "<8001 characters>"})
        await alice.recv()
        await alice.send({"type": "history", "conversation_id": cid, "limit": 101, "ref": "b4"})
        await alice.recv()
        await alice.send({"type": "join", "conversation_id": "trip-1", "ref": "b5"})
        await alice.recv()
        deep: Any = "x"
        for _ in range(17):
            deep = [deep]
        shown_deep = {"type": "ping", "ref": "b6", "ts": 1, "extra": "<17 nested arrays>"}
        await alice.send({"type": "ping", "ref": "b6", "ts": 1, "extra": deep}, shown_deep)
        await alice.recv()
        raw = b'{"type": "ping", "ts": "caf\xe9"}'
        show(f"alice -> {raw!r}    (raw text frame, Latin-1: not UTF-8)")
        await alice.ws.send_frame(raw, WSMsgType.TEXT)
        await alice.recv()

        section("membership errors")
        ws = await http.ws_connect(
            ws_url,
            protocols=("chat.v1.json",),
            headers={"Authorization": f"Bearer {mallory_token}"},
        )
        mallory = Peer("mallory", ws)
        await mallory.until("hello")
        await mallory.send({"type": "join", "conversation_id": cid, "ref": "m1"})
        await mallory.recv()
        await mallory.send({"type": "join", "conversation_id": str(uuid.uuid4()), "ref": "m2"})
        await mallory.recv()
        await mallory.send({"type": "cancel", "generation_id": str(uuid.uuid4()), "ref": "m3"})
        await mallory.recv()
        await mallory.close()

        section("cancel a reply mid-stream")
        await alice.send(
            {
                "type": "send",
                "conversation_id": cid,
                "client_msg_id": "c-2",
                "text": "Tell me everything about the coast of Portugal in spring please",
                "ref": "s3",
            }
        )
        await alice.until("ack")
        await alice.until("message")
        start = await alice.until("gen_start")
        await alice.until("delta")
        await alice.send({"type": "cancel", "generation_id": start["generation_id"], "ref": "x1"})
        await alice.until("gen_end")
        end = await quiet(bob, "gen_end")
        bob_since["offset"] = end["message"]["offset"]

        section("rejoin with since while a reply is streaming: recovered + generation snapshot")
        show(f"bob    [last saw offset {bob_since['offset']}, epoch {epoch}; disconnects]")
        await bob.close()
        await alice.send(
            {
                "type": "send",
                "conversation_id": cid,
                "client_msg_id": "c-3",
                "text": "And what about the Algarve beaches",
                "ref": "s4",
            }
        )
        await alice.until("gen_start")
        await alice.until("delta")
        await alice.until("delta")
        show("bob    [reconnects meanwhile]")
        ws = await http.ws_connect(
            ws_url,
            protocols=("chat.v1.json",),
            headers={"Authorization": f"Bearer {bob_token}"},
        )
        bob = Peer("bob", ws)
        await bob.until("hello")
        await bob.send({"type": "join", "conversation_id": cid, "since": bob_since, "ref": "j3"})
        await bob.until("joined")
        await bob.until("gen_end")
        show("alice    [meanwhile receives the rest of the stream]")
        await quiet(alice, "gen_end")

        section("join with a stale epoch: not recovered, the latest window instead")
        await bob.send(
            {
                "type": "join",
                "conversation_id": cid,
                "since": {"offset": 1, "epoch": "0123456789ab"},
                "ref": "j4",
            }
        )
        await bob.until("joined")

        section("leave")
        await bob.send({"type": "leave", "conversation_id": cid, "ref": "l1"})
        await bob.until("left")

        section("MessagePack encoding (binary frames): the same objects")
        ws = await http.ws_connect(
            ws_url,
            protocols=("chat.v1.msgpack",),
            headers={"Authorization": f"Bearer {bob_token}"},
        )
        msg = await ws.receive(timeout=TIMEOUT_S)
        show(f"bob    [subprotocol {ws.protocol}]")
        show(f"bob <- binary {len(msg.data)} bytes: {msgpack.unpackb(msg.data)}")
        ping = msgpack.packb({"type": "ping", "ts": 42})
        show(f"bob -> binary {ping.hex(' ')}    ({{'type': 'ping', 'ts': 42}})")
        await ws.send_bytes(ping)
        msg = await ws.receive(timeout=TIMEOUT_S)
        show(f"bob <- binary {msg.data.hex(' ')}    ({msgpack.unpackb(msg.data)})")
        await ws.close()

        section("REST after the session")
        await rest.call("GET", "/api/conversations?limit=10", alice_token)
        await rest.call("GET", f"/api/conversations/{cid}/messages?limit=2", alice_token)
        await rest.call("GET", "/api/health")
        await rest.call("GET", "/healthz")
        await rest.call("GET", "/readyz")
        _, text = await rest.call("GET", "/metrics", quiet=True)
        wanted = ("chat_connections{", "chat_replies_total{", "chat_messages_persisted_total")
        show("<- 200 (text exposition; a few lines)")
        for line in str(text).splitlines():
            if line.startswith(wanted):
                show("   " + line)

        await configured_server(http)

        section("a frame over max_frame_bytes: close 1009")
        ws = await http.ws_connect(
            ws_url,
            protocols=("chat.v1.json",),
            headers={"Authorization": f"Bearer {mallory_token}"},
        )
        mallory = Peer("mallory", ws)
        await mallory.until("hello")
        huge = {"type": "ping", "ts": "y" * 70_000}
        show(f"mallory -> {dumps({'type': 'ping', 'ts': '<70000 characters>'})}")
        await ws.send_str(json.dumps(huge))
        await mallory.recv()

        section("too many bad frames: the 21st within a minute closes with 1008")
        limit = 20
        for i in range(limit + 1):
            frame = {"type": "join", "ref": f"z{i + 1}"}
            if i in (0, limit):
                await bob.send(frame)
                await bob.recv()
            else:
                await bob.ws.send_str(json.dumps(frame))
                await quiet(bob, "error")
                if i == 1:
                    show(f"bob    [... bad frames z2 to z{limit} and their errors ...]")
        await bob.recv()

        section("server shutdown: reconnect, then close 1001")
        show("server    [stops: replies finish, clients are told to reconnect]")
        STOP.set()
        await alice.recv()
        await alice.recv()


SECRET = "capture-secret-0123456789abcdef0123456789abcdef"
OLD_SECRET = "capture-old-secret-0123456789abcdef0123456789ab"
SMALL_FREE_TIER = "messages_per_minute=2,connections=2,daily_tokens=20"


async def configured_server(http: aiohttp.ClientSession) -> None:
    """A second server: a configured secret, an Origin allow-list, tiny free-tier limits."""
    async with serving(
        "capture-2",
        jwt_secret=SECRET,
        jwt_secret_previous=OLD_SECRET,
        allowed_origins="https://chat.example.com",
        limits_free=SMALL_FREE_TIER,
    ) as base:
        await configured_session(http, base, base.replace("http://", "ws://", 1) + "/ws")


async def configured_session(http: aiohttp.ClientSession, base: str, ws_url: str) -> None:
    rest = Rest(http, base)
    current, previous = Authenticator(SECRET), Authenticator(OLD_SECRET)
    show("")
    show(
        "# second server (server_id capture-2): CHAT_JWT_SECRET and CHAT_JWT_SECRET_PREVIOUS "
        "set, CHAT_ALLOWED_ORIGINS=https://chat.example.com, "
        f"CHAT_LIMITS_FREE={SMALL_FREE_TIER}"
    )

    section("configured secret: no dev tokens")
    await rest.call("POST", "/api/dev/token", body={"user_id": "dave"})

    section("Origin not in CHAT_ALLOWED_ORIGINS: error, then close 4403 (before authentication)")
    ws = await http.ws_connect(
        ws_url,
        headers={
            "Origin": "https://evil.example",
            "Authorization": f"Bearer {current.issue('erin')}",
        },
    )
    show("erin    [upgrade with Origin: https://evil.example]")
    erin = Peer("erin", ws)
    await erin.recv()
    await erin.recv()

    section("token rotation: a token signed with CHAT_JWT_SECRET_PREVIOUS is still accepted")
    ws = await http.ws_connect(ws_url, headers={"Origin": "https://chat.example.com"})
    show("frank    [upgrade with Origin: https://chat.example.com]")
    frank = Peer("frank", ws)
    await frank.send(
        {"type": "auth", "token": previous.issue("frank")},
        {"type": "auth", "token": "<jwt signed with the previous secret>"},
    )
    await frank.recv()
    await frank.close()

    section("leeway: expired 10 s ago is accepted (CHAT_JWT_LEEWAY_S=30), 60 s ago is not")
    for ago in (10, 60):
        ws = await http.ws_connect(ws_url)
        grace = Peer("grace", ws)
        await grace.send(
            {"type": "auth", "token": current.issue("grace", ttl_s=-ago)},
            {"type": "auth", "token": f"<jwt that expired {ago} s ago>"},
        )
        first = await grace.recv()
        if first["type"] == "hello":
            await grace.close()
        else:
            await grace.recv()

    section("connections per user (free tier here: 2): the third gets an error, then close 4429")
    dave_token = current.issue("dave")
    daves = []
    for n in (1, 2, 3):
        ws = await http.ws_connect(ws_url, headers={"Authorization": f"Bearer {dave_token}"})
        name = "dave" if n == 1 else f"dave#{n}"
        show(f"{name}    [connects]")
        dave = Peer(name, ws)
        frame = await dave.recv()
        if frame["type"] == "hello":
            daves.append(dave)
        else:
            await dave.recv()
    dave = daves[0]

    section("rate limit and daily quota (free tier here: 2 messages a minute, 20 tokens a day)")
    _, conv = await rest.call("POST", "/api/conversations", dave_token, {"agent_id": "general"})
    cid = conv["id"]
    show("dave    [joins the conversation]")
    await dave.ws.send_str(json.dumps({"type": "join", "conversation_id": cid}))
    await quiet(dave, "joined")
    await dave.send(
        {"type": "send", "conversation_id": cid, "client_msg_id": "d-1", "text": "Hi", "ref": "q1"}
    )
    await dave.until("ack")
    end = await quiet(dave, "gen_end")
    usage = end["usage"]
    show(
        f"dave    [... message, gen_start, deltas; gen_end with usage {usage['input_tokens']} in"
        f" + {usage['output_tokens']} out: the day's 20 tokens are used up]"
    )
    await asyncio.sleep(0.2)
    await dave.send(
        {"type": "send", "conversation_id": cid, "client_msg_id": "d-2", "text": "Hi", "ref": "q2"}
    )
    await dave.recv()
    await dave.send(
        {"type": "send", "conversation_id": cid, "client_msg_id": "d-3", "text": "Hi", "ref": "q3"}
    )
    await dave.recv()

    section("GET /api/admin/stats: role admin only")
    await rest.call("GET", "/api/admin/stats", current.issue("ops", role="admin"))
    await rest.call("GET", "/api/admin/stats", dave_token)
    for peer in daves:
        await peer.ws.close()


async def quiet(peer: Peer, kind: str) -> dict[str, Any]:
    """Read frames without printing them, up to the first of ``kind``."""
    while True:
        msg = await peer.ws.receive(timeout=TIMEOUT_S)
        if msg.type is not WSMsgType.TEXT:
            raise RuntimeError(f"{peer.name}: unexpected {msg!r}")
        frame: dict[str, Any] = json.loads(msg.data)
        if frame["type"] == kind:
            return frame


STOP = asyncio.Event()


@contextlib.asynccontextmanager
async def serving(server_id: str, **options: Any) -> AsyncIterator[str]:
    """An embedded server on a free port with a SQLite file of its own; yields its base URL."""
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings.of(
            sqlite_path=str(Path(tmp) / f"{server_id}.sqlite3"),
            server_id=server_id,
            local_ttft_ms=100,
            local_token_ms=25,
            shutdown_grace_s=2.0,
            **options,
        )
        runner = web.AppRunner(create_app(settings), shutdown_timeout=5)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        host, port = runner.addresses[0][:2]
        try:
            yield f"http://{host}:{port}"
        finally:
            await runner.cleanup()


async def main() -> None:
    logging.basicConfig(level=logging.ERROR)
    async with serving("capture-1") as base:
        show(f"# server: embedded mode on {base}/ (server_id capture-1)")
        client = asyncio.create_task(session(base))
        stop = asyncio.create_task(STOP.wait())
        await asyncio.wait({client, stop}, return_when=asyncio.FIRST_COMPLETED)
        if client.done():
            client.result()  # a failure before the shutdown step
    await client  # the shutdown step: the server drains while the client watches


if __name__ == "__main__":
    asyncio.run(main())
