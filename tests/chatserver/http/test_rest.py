"""The REST side of the contract."""

from __future__ import annotations

import asyncio
import base64

import jwt
import pytest

from chatclient.client import ChatApi
from chatserver import keys
from chatserver.auth import Authenticator

from ..conftest import Harness, MakeHarness, eventually, outbox_drained

SECRET = "a-configured-secret-of-enough-length-0123456789"


async def test_agents_list_is_public_agents_with_cache_headers(harness: Harness) -> None:
    api = await harness.api("alice")
    async with harness.http.get(
        harness.base_url + "/api/agents", headers={"Authorization": f"Bearer {api.token}"}
    ) as resp:
        assert resp.status == 200
        assert resp.headers["Cache-Control"] == "public, s-maxage=60, stale-while-revalidate=120"
        body = await resp.json()
    ids = [a["id"] for a in body["items"]]
    assert {"general", "health-coach", "finance-helper"} <= set(ids)
    assert set(body["items"][0]) == {"id", "name", "description", "model", "public"}


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/agents"),
        ("POST", "/api/conversations"),
        ("GET", "/api/conversations"),
        ("GET", "/api/conversations/x/messages"),
    ],
)
@pytest.mark.parametrize("header", [None, "Bearer nonsense", "Basic abc"])
async def test_api_routes_need_a_valid_token(
    harness: Harness, method: str, path: str, header: str | None
) -> None:
    headers = {"Authorization": header} if header else {}
    async with harness.http.request(method, harness.base_url + path, headers=headers) as resp:
        assert resp.status == 401
        body = await resp.json()
    assert body["error"]["code"] == "unauthorized" and body["error"]["message"]


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/api/health", "/", "/metrics"])
async def test_open_routes_need_no_token(harness: Harness, path: str) -> None:
    async with harness.http.get(harness.base_url + path) as resp:
        assert resp.status == 200


async def test_health_reports_each_dependency(harness: Harness) -> None:
    async with harness.http.get(harness.base_url + "/api/health") as resp:
        body = await resp.json()
    assert body["status"] == "ok"
    assert set(body["checks"]) == {"database", "redis", "ai"}
    assert body["checks"]["database"] == {"status": "ok", "backend": "sqlite"}


async def test_create_conversation(harness: Harness) -> None:
    api = await harness.api("alice")
    status, body = await api.request(
        "POST",
        "/api/conversations",
        json={"agent_id": "health-coach", "title": "Sleep", "members": ["bob", "alice", "bob"]},
    )
    assert status == 201
    assert body["agent_id"] == "health-coach" and body["title"] == "Sleep"
    assert body["owner_id"] == "alice" and body["members"] == ["alice", "bob"]
    assert body["created_at"] == body["updated_at"] and body["created_at"].endswith("Z")


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"agent_id": "no-such-agent"}, "unknown agent_id"),
        ({}, "agent_id"),
        ({"agent_id": "general", "title": 5}, "title"),
        ({"agent_id": "general", "members": "bob"}, "members"),
        ({"agent_id": "general", "members": [1]}, "members"),
        ({"agent_id": "general", "members": ["x" * 65]}, "member"),
        ({"agent_id": "general", "title": "t" * 201}, "title"),
        ([1, 2], "JSON object"),
    ],
)
async def test_create_conversation_rejects_bad_bodies(
    harness: Harness, payload: object, message: str
) -> None:
    api = await harness.api("alice")
    status, body = await api.request("POST", "/api/conversations", json=payload)
    assert status == 400
    assert body["error"]["code"] == "bad_request" and message in body["error"]["message"]


@pytest.mark.parametrize(
    "data",
    [
        b"{nope",
        b'{"agent_id": "general", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        b"\xff\xfe not utf-8",
    ],
    ids=["syntax", "nested-5000", "not-utf8"],
)
async def test_create_conversation_rejects_invalid_json(harness: Harness, data: bytes) -> None:
    api = await harness.api("alice")
    status, body = await api.request("POST", "/api/conversations", data=data)
    assert (status, body["error"]["code"]) == (400, "bad_request")


@pytest.mark.parametrize(
    ("body", "field", "problem"),
    [
        (b'{"agent_id": "general", "title": "\\ud800"}', "title", "lone surrogate"),
        (b'{"agent_id": "general", "title": "a\\u0000b"}', "title", "NUL"),
        (b'{"agent_id": "general", "title": "two\\nlines"}', "title", "control character"),
        (b'{"agent_id": "general", "members": ["bo\\u0000b"]}', "members[]", "NUL"),
        (b'{"agent_id": "gen\\u001beral"}', "agent_id", "control character"),
    ],
)
async def test_text_fields_refuse_nul_control_characters_and_lone_surrogates(
    harness: Harness, body: bytes, field: str, problem: str
) -> None:
    api = await harness.api("alice")
    status, answer = await api.request("POST", "/api/conversations", data=body)
    assert (status, answer["error"]["code"]) == (400, "bad_request")
    assert f"'{field}'" in answer["error"]["message"] and problem in answer["error"]["message"]
    _, listed = await api.request("GET", "/api/conversations")
    assert listed["items"] == []


async def test_an_aborted_upload_is_the_clients_doing_not_a_dependency_failure(
    harness: Harness,
) -> None:
    token = await harness.token("alice")
    host, port = harness.base_url.removeprefix("http://").split(":")
    _reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"POST /api/conversations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + token.encode() + b"\r\nContent-Length: 5000\r\n\r\n"
        b'{"agent_id": "gen'
    )
    await writer.drain()
    writer.close()
    metrics = harness.app[keys.METRICS]

    def answered() -> list[str]:
        text = metrics.exposition().decode()
        return [
            line
            for line in text.splitlines()
            if line.startswith("chat_http_request_duration_seconds_count")
            and 'route="/api/conversations"' in line
            and 'method="POST"' in line
        ]

    await eventually(lambda: bool(answered()), what="the aborted request to be counted")
    assert all('status="499"' in line for line in answered()), answered()
    # every code's series exists from the start: this one stayed at 0
    assert 'chat_errors_total{code="unavailable"} 0.0' in metrics.exposition().decode()


async def test_a_stalled_body_is_answered_within_the_idle_timeout(
    make_harness: MakeHarness,
) -> None:
    harness = await make_harness(http_idle_timeout_s=0.5)
    token = await harness.token("alice")
    host, port = harness.base_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"POST /api/conversations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + token.encode() + b"\r\nContent-Length: 5000\r\n\r\n"
        b'{"agent_id": "gen'
    )
    await writer.drain()
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 400 ")
    finally:
        writer.close()


async def test_page_and_static_files_carry_the_browser_protections(harness: Harness) -> None:
    for path in ("/", "/static/app.js", "/static/style.css"):
        async with harness.http.get(harness.base_url + path) as resp:
            assert resp.status == 200
            assert resp.headers["X-Content-Type-Options"] == "nosniff"
            csp = resp.headers["Content-Security-Policy"]
            assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp
            assert resp.headers["Server"] == "chatserver"
    async with harness.http.get(harness.base_url + "/api/health") as resp:
        assert resp.headers["Server"] == "chatserver"
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
    async with harness.http.ws_connect(harness.ws_url) as ws:
        assert ws._response.headers["Server"] == "chatserver"
        assert "X-Content-Type-Options" not in ws._response.headers  # a 101: nothing to sniff


async def test_conversation_list_is_keyset_paged_by_recent_update(harness: Harness) -> None:
    api = await harness.api("alice")
    made = [(await api.create_conversation(title=f"c{i}"))["id"] for i in range(5)]
    pages, cursor, order = [], None, []
    while True:
        query = "?limit=2" + (f"&cursor={cursor}" if cursor else "")
        status, body = await api.request("GET", "/api/conversations" + query)
        assert status == 200
        pages.append([c["id"] for c in body["items"]])
        order += [(c["updated_at"], c["id"]) for c in body["items"]]
        if not body["has_more"]:
            assert body["next_cursor"] is None
            break
        cursor = body["next_cursor"]
    assert [len(p) for p in pages] == [2, 2, 1]
    listed = [c for p in pages for c in p]
    assert sorted(listed) == sorted(made)  # every one once, none twice
    assert order == sorted(order, reverse=True)  # most recently updated first
    # A message moves the oldest conversation to the top.
    alice = await harness.connect("alice")
    await alice.send(made[0], "bump")
    await outbox_drained(harness.app)
    _, body = await api.request("GET", "/api/conversations?limit=1")
    assert body["items"][0]["id"] == made[0]
    assert body["items"][0]["updated_at"] > body["items"][0]["created_at"]
    # Someone else sees only their own.
    other = await harness.api("bob")
    _, body = await other.request("GET", "/api/conversations")
    assert body == {"items": [], "next_cursor": None, "has_more": False}


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@pytest.mark.parametrize(
    "query",
    [
        "limit=0",
        "limit=101",
        "limit=x",
        "cursor=%25%25bad",
        "cursor=" + _b64(b"[" * 3000),  # nested past the parser's stack
        "cursor=" + _b64(b'["\\u0000", "x"]'),  # NUL, which Postgres refuses in text
        "cursor=" + _b64(b'["\\ud800", "x"]'),  # a lone surrogate
        "cursor=" + "A" * 600,
    ],
)
async def test_conversation_list_rejects_bad_queries(harness: Harness, query: str) -> None:
    api = await harness.api("alice")
    status, body = await api.request("GET", "/api/conversations?" + query)
    assert (status, body["error"]["code"]) == (400, "bad_request")


async def test_message_pages(harness: Harness) -> None:
    conv = await harness.conversation("alice", members=["bob"])
    alice = await harness.connect("alice")
    await alice.join(conv)
    for i in range(3):
        ack = await alice.send(conv, f"q{i}")
        await alice.reply(ack.message_id)
    api = await harness.api("bob")
    status, body = await api.request("GET", f"/api/conversations/{conv}/messages?limit=4")
    assert status == 200 and body["has_more"]
    assert [m["offset"] for m in body["items"]] == [3, 4, 5, 6]
    _, body = await api.request("GET", f"/api/conversations/{conv}/messages?before=3&limit=4")
    assert [m["offset"] for m in body["items"]] == [1, 2] and not body["has_more"]
    assert body["items"][0]["text"] == "q0" and body["items"][0]["user_id"] == "alice"
    assert body["items"][1]["role"] == "assistant" and body["items"][1]["agent_id"] == "general"
    for bad in ("limit=0", "limit=101", "before=0", "before=abc"):
        status, body = await api.request("GET", f"/api/conversations/{conv}/messages?{bad}")
        assert (status, body["error"]["code"]) == (400, "bad_request")
    outsider = await harness.api("mallory")
    status, body = await outsider.request("GET", f"/api/conversations/{conv}/messages")
    assert (status, body["error"]["code"]) == (403, "forbidden")
    status, body = await outsider.request("GET", "/api/conversations/unknown/messages")
    assert (status, body["error"]["code"]) == (404, "not_found")


async def test_dev_token_route(harness: Harness) -> None:
    api = ChatApi(harness.base_url, None, harness.http)
    status, body = await api.request(
        "POST", "/api/dev/token", json={"user_id": "u1", "tier": "pro"}
    )
    assert status == 200
    claims = jwt.decode(body["token"], options={"verify_signature": False})
    assert (claims["sub"], claims["tier"]) == ("u1", "pro") and claims["exp"] > claims["iat"]
    for bad in ({"user_id": ""}, {"user_id": "u", "tier": "gold"}, {"tier": "pro"}):
        status, body = await api.request("POST", "/api/dev/token", json=bad)
        assert (status, body["error"]["code"]) == (400, "bad_request")


async def test_with_a_configured_secret_there_is_no_dev_route(make_harness: MakeHarness) -> None:
    harness = await make_harness(jwt_secret=SECRET)
    assert not harness.app[keys.AUTH].dev_mode
    async with harness.http.post(harness.base_url + "/api/dev/token", json={"user_id": "x"}) as r:
        assert r.status == 404
    token = Authenticator(SECRET).issue("alice", "enterprise")
    api = ChatApi(harness.base_url, token, harness.http)
    status, body = await api.request("POST", "/api/conversations", json={"agent_id": "general"})
    assert status == 201 and body["owner_id"] == "alice"


async def test_metrics_exposition(harness: Harness) -> None:
    conv = await harness.conversation("alice")
    alice = await harness.connect("alice")
    await alice.join(conv)
    ack = await alice.send(conv, "count me")
    await alice.reply(ack.message_id)
    async with harness.http.get(harness.base_url + "/metrics") as resp:
        text = await resp.text()
    assert 'chat_frames_in_total{type="send"} 1.0' in text
    assert 'chat_replies_total{finish_reason="stop"} 1.0' in text
    assert 'chat_connections{encoding="json"} 1.0' in text


async def test_index_page_is_served(harness: Harness) -> None:
    async with harness.http.get(harness.base_url + "/") as resp:
        assert resp.status == 200 and resp.content_type == "text/html"
