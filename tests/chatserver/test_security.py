"""Nobody reaches what is not theirs; hostile input is refused cleanly."""

from __future__ import annotations

import base64
import json
import time

import aiohttp
import jwt
import pytest

from chatclient.client import ChatApi, ChatClient, ChatError
from chatserver import keys
from chatserver.auth import Authenticator
from protocol import CloseCode, ErrorCode, ErrorFrame, Left, Pong

from .conftest import Harness, MakeHarness
from .rawws import RawWebSocket

SECRET = "security-test-secret-0123456789abcdef0123"
OLD_SECRET = "the-previous-secret-0123456789abcdef01234"
HOSTILE = [
    "'; DROP TABLE messages; --",
    '" OR 1=1 --',
    "\\x00\\u0000 %s %n {{7*7}} ${jndi:ldap://x}",
    "<script>alert(1)</script>",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ☃ \u202e reversed",
]


async def _error(client: ChatClient) -> ErrorFrame:
    return await client.expect(ErrorFrame)


async def test_another_users_conversation_through_every_frame(harness: Harness) -> None:
    conv = await harness.conversation("alice")
    alice = await harness.connect("alice")
    await alice.join(conv)
    ack = await alice.send(conv, "private words " + "w " * 50)
    eve = await harness.connect("eve")
    for frame in (
        {"type": "join", "conversation_id": conv},
        {"type": "join", "conversation_id": conv, "since": {"offset": 0, "epoch": "x"}},
        {"type": "send", "conversation_id": conv, "client_msg_id": "e1", "text": "hi"},
        {"type": "history", "conversation_id": conv},
        {"type": "history", "conversation_id": conv, "before": 2, "limit": 1},
        {"type": "typing", "conversation_id": conv},
    ):
        await eve.send_raw(json.dumps({**frame, "ref": "r"}))
        error = await _error(eve)
        assert (error.code, error.ref) == (ErrorCode.FORBIDDEN.value, "r")
        assert "private" not in error.message
    # leaving a conversation one is not in reveals nothing and touches nothing
    await eve.send_raw(json.dumps({"type": "leave", "conversation_id": conv, "ref": "l"}))
    left = await eve.expect(Left)
    assert left.ref == "l"
    reply = await alice.reply(ack.message_id)
    assert reply.end is not None
    # nothing of alice's conversation ever reached eve
    await eve.ping("flush")
    assert all("private" not in json.dumps(f.to_dict()) for f in eve.pending()), (
        "eve saw alice's text"
    )


async def test_another_users_reply_cannot_be_cancelled(harness: Harness) -> None:
    conv = await harness.conversation("alice")
    alice = await harness.connect("alice")
    await alice.join(conv)
    harness.app[keys.GENERATION].provider.token_s = 0.05
    ack = await alice.send(conv, "a long answer please " + "w " * 40)
    from protocol import GenStart

    start = await alice.expect(GenStart)
    eve = await harness.connect("eve")
    await eve.send_raw(json.dumps({"type": "cancel", "generation_id": start.generation_id}))
    assert (await _error(eve)).code == ErrorCode.FORBIDDEN.value
    harness.app[keys.GENERATION].provider.token_s = 0.001
    reply = await alice.follow(start.generation_id, start)
    assert reply.end is not None and reply.end.finish_reason == "stop"
    assert reply.end.message is not None and reply.end.message.reply_to == ack.message_id


async def test_another_users_conversation_through_every_route(harness: Harness) -> None:
    conv = await harness.conversation("alice", title="alice's secret plans")
    alice = await harness.connect("alice")
    await alice.send(conv, "private words")
    alice_api = await harness.api("alice")
    eve = await harness.api("eve")
    status, body = await eve.request("GET", f"/api/conversations/{conv}/messages")
    assert (status, body["error"]["code"]) == (403, "forbidden")
    status, body = await eve.request("GET", "/api/conversations")
    assert body["items"] == []
    # alice's cursor in eve's hands pages through eve's own conversations only
    for i in range(3):
        await alice_api.create_conversation(title=f"more {i}")
    _, page = await alice_api.request("GET", "/api/conversations?limit=1")
    cursor = page["next_cursor"]
    assert cursor
    status, body = await eve.request("GET", f"/api/conversations?cursor={cursor}")
    assert status == 200 and body["items"] == []
    # an admin-only route
    status, body = await eve.request("GET", "/api/admin/stats")
    assert (status, body["error"]["code"]) == (403, "forbidden")
    for path in ("/api/conversations/not-a-uuid/messages", "/api/conversations/%27%3B/messages"):
        status, body = await eve.request("GET", path)
        assert (status, body["error"]["code"]) == (404, "not_found")


async def test_admin_stats_for_admins(make_harness: MakeHarness) -> None:
    harness = await make_harness(jwt_secret=SECRET)
    api = ChatApi(harness.base_url, Authenticator(SECRET).issue("ops", role="admin"), harness.http)
    status, body = await api.request("GET", "/api/admin/stats")
    assert status == 200
    assert set(body) >= {"server_id", "connections", "replies", "outbox_backlog", "draining"}


def _tamper(token: str) -> str:
    """Change the claims, keep the signature."""
    head, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["sub"] = "alice"
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{head}.{forged}.{signature}"


async def test_token_rotation_forgery_and_leeway(make_harness: MakeHarness) -> None:
    harness = await make_harness(jwt_secret=SECRET, jwt_secret_previous=OLD_SECRET)
    now = int(time.time())
    accepted = {
        "current": Authenticator(SECRET).issue("alice"),
        "previous": Authenticator(OLD_SECRET).issue("alice"),
        "within leeway": jwt.encode({"sub": "alice", "exp": now - 5}, SECRET, "HS256"),
    }
    for name, token in accepted.items():
        client = await ChatClient.connect(harness.ws_url, token)
        assert client.hello is not None, name
        await client.close()
    refused = {
        "another secret": Authenticator("some-other-secret-0123456789abcdef").issue("alice"),
        "re-signed claims": _tamper(Authenticator(SECRET).issue("eve")),
        "alg none": jwt.encode({"sub": "alice", "exp": now + 60}, None, "none"),  # type: ignore[arg-type]
        "long expired": jwt.encode({"sub": "alice", "exp": now - 120}, SECRET, "HS256"),
        "bad tier": jwt.encode({"sub": "alice", "exp": now + 60, "tier": "gold"}, SECRET, "HS256"),
        "sub too long": jwt.encode({"sub": "a" * 65, "exp": now + 60}, SECRET, "HS256"),
    }
    async with aiohttp.ClientSession() as http:
        for name, token in refused.items():
            ws = await http.ws_connect(harness.ws_url, headers={"Authorization": f"Bearer {token}"})
            first = await ws.receive(timeout=5)
            assert '"code":"unauthorized"' in first.data, name
            await ws.receive(timeout=5)
            assert ws.close_code == CloseCode.UNAUTHORIZED, name


async def test_a_wrong_origin_is_closed_4403(make_harness: MakeHarness) -> None:
    harness = await make_harness(jwt_secret=SECRET, allowed_origins="https://chat.example")
    token = Authenticator(SECRET).issue("alice")
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(
            harness.ws_url,
            headers={"Origin": "https://evil.example", "Authorization": f"Bearer {token}"},
        )
        first = await ws.receive(timeout=5)
        assert '"code":"forbidden"' in first.data
        await ws.receive(timeout=5)
        assert ws.close_code == CloseCode.FORBIDDEN
        good = await http.ws_connect(
            harness.ws_url,
            headers={"Origin": "https://chat.example", "Authorization": f"Bearer {token}"},
        )
        assert '"hello"' in (await good.receive(timeout=5)).data
        await good.close()


async def test_origins_are_not_checked_in_dev_mode(make_harness: MakeHarness) -> None:
    harness = await make_harness(allowed_origins="https://chat.example")
    token = await harness.token("alice")
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(
            harness.ws_url,
            headers={"Origin": "http://localhost:3000", "Authorization": f"Bearer {token}"},
        )
        assert '"hello"' in (await ws.receive(timeout=5)).data
        await ws.close()


@pytest.mark.parametrize("hostile", HOSTILE)
async def test_hostile_text_in_every_field_is_stored_verbatim_or_refused(
    harness: Harness, hostile: str
) -> None:
    api = await harness.api("alice")
    status, conversation = await api.request(
        "POST", "/api/conversations", json={"agent_id": "general", "title": hostile}
    )
    assert status == 201 and conversation["title"] == hostile
    conv = conversation["id"]
    alice = await harness.connect("alice")
    await alice.join(conv)
    ack = await alice.send(conv, hostile, client_msg_id=hostile[:64])
    assert ack.client_msg_id == hostile[:64]
    page = await alice.history(conv)
    assert page.messages[0].text == hostile and page.messages[0].client_msg_id == hostile[:64]
    await alice.send_raw(json.dumps({"type": "ping", "ts": hostile[:64], "ref": hostile[:64]}))
    pong = await alice.expect(Pong)
    assert pong.ts == hostile[:64] and pong.ref == hostile[:64]
    status, _ = await api.request("POST", "/api/dev/token", json={"user_id": hostile[:64]})
    assert status == 200
    _, listed = await api.request("GET", "/api/conversations")
    assert any(c["title"] == hostile for c in listed["items"])


async def test_huge_and_deep_payloads_are_refused_and_serving_goes_on(harness: Harness) -> None:
    conv = await harness.conversation("alice")
    alice = await harness.connect("alice")
    deep = '{"a":' * 5000 + '"x"' + "}" * 5000
    for payload in (
        '{"type":"send","conversation_id":"%s","client_msg_id":"d","text":%s}' % (conv, deep),
        "[" * 20000 + "]" * 20000,
        json.dumps({"type": "ping", "x": [[[[[[[[[[[[[[[[[[["deep"]]]]]]]]]]]]]]]]]]]}),
        json.dumps(
            {"type": "send", "conversation_id": conv, "client_msg_id": "k" * 65, "text": "t"}
        ),
        json.dumps(
            {"type": "join", "conversation_id": conv, "since": {"offset": 2**70, "epoch": "e"}}
        ),
    ):
        await alice.send_raw(payload)
        assert (await _error(alice)).code in (ErrorCode.BAD_FRAME.value, ErrorCode.TOO_LARGE.value)
    assert (await alice.ping(1)).ts == 1
    api = await harness.api("alice")
    status, body = await api.request(
        "POST",
        "/api/conversations",
        data=b'{"agent_id":"general","title":"' + b"x" * 300_000 + b'"}',
    )
    assert (status, body["error"]["code"]) == (413, "too_large")
    with pytest.raises(ChatError):
        await alice.send(conv, "y" * 8001)
    assert (await alice.send(conv, "still served")).offset == 1


async def test_invalid_utf8_in_a_text_frame_is_a_bad_frame(harness: Harness) -> None:
    assert harness.server.port is not None
    raw = await RawWebSocket.connect("127.0.0.1", harness.server.port, await harness.token("alice"))
    try:
        _, hello = await raw.read_frame()
        assert b'"hello"' in hello
        await raw.send_frame(0x1, b'{"type":"ping","ts":"\xff\xfe"}')
        _, error = await raw.read_frame()
        assert b'"bad_frame"' in error and b"UTF-8" in error
        await raw.send_text('{"type":"ping","ts":5}')
        _, pong = await raw.read_frame()
        assert b'"pong"' in pong and b'"ts":5' in pong
    finally:
        raw.close()
