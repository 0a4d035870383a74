"""Caps on what one socket or address may hold: unauthenticated sockets, joined
conversations, typing notices; and the token claims a configured server insists on."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack

import aiohttp
import jwt
import pytest

from chatclient.client import ChatClient, ChatError
from chatserver.auth import Authenticator
from protocol import CloseCode, MessageEvent, TypingNotice

from ..conftest import Harness, MakeHarness

SECRET = "caps-test-secret-0123456789abcdef0123456789"


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def _pending(
    http: aiohttp.ClientSession, harness: Harness, forwarded: str | None = None
) -> aiohttp.ClientWebSocketResponse:
    """An upgraded socket that has not authenticated (no token anywhere)."""
    headers = {"X-Forwarded-For": forwarded} if forwarded else {}
    return await http.ws_connect(harness.ws_url, headers=headers)


async def _refused_status(
    http: aiohttp.ClientSession, harness: Harness, forwarded: str | None = None
) -> int:
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await _pending(http, harness, forwarded)
    return refused.value.status


async def test_unauthenticated_sockets_are_capped_per_address(
    make_harness: MakeHarness, http: aiohttp.ClientSession
) -> None:
    harness = await make_harness(max_pending_auth_per_address=3, auth_timeout_s=60)
    waiting = [await _pending(http, harness) for _ in range(3)]
    assert await _refused_status(http, harness) == 429
    # REST is not an upgrade: never counted
    async with http.get(harness.base_url + "/healthz") as response:
        assert response.status == 200
    # authenticating frees the slot (also a failed authentication: it ends the wait)
    await waiting[0].send_json({"type": "auth", "token": await harness.token("alice")})
    assert '"hello"' in (await waiting[0].receive(timeout=5)).data
    fourth = await _pending(http, harness)
    await waiting[1].send_json({"type": "auth", "token": "not-a-jwt"})
    assert '"unauthorized"' in (await waiting[1].receive(timeout=5)).data
    await waiting[1].receive(timeout=5)
    assert waiting[1].close_code == CloseCode.UNAUTHORIZED
    fifth = await _pending(http, harness)
    assert await _refused_status(http, harness) == 429
    # a socket that hangs up before authenticating frees its slot too
    await fifth.close()
    await asyncio.wait_for(_admitted_after_release(http, harness), 5)
    for ws in (*waiting, fourth):
        await ws.close()


async def _admitted_after_release(http: aiohttp.ClientSession, harness: Harness) -> None:
    # The server sees the hang-up a moment after the client's close returns: poll it.
    while True:
        try:
            ws = await _pending(http, harness)
        except aiohttp.WSServerHandshakeError:
            await asyncio.sleep(0.01)
            continue
        await ws.close()
        return


async def test_unauthenticated_sockets_are_capped_per_instance(
    make_harness: MakeHarness, http: aiohttp.ClientSession
) -> None:
    harness = await make_harness(
        max_pending_auth=2, max_pending_auth_per_address=100, auth_timeout_s=60
    )
    waiting = [await _pending(http, harness) for _ in range(2)]
    response_status = await _refused_status(http, harness)
    assert response_status == 429
    # an authenticated connection (token in the upgrade request) passes through quickly
    await waiting[0].close()
    await asyncio.wait_for(_admitted_after_release(http, harness), 5)
    await waiting[1].close()


async def test_forwarded_addresses_count_only_from_a_trusted_proxy(
    make_harness: MakeHarness, http: aiohttp.ClientSession
) -> None:
    # Not trusted: X-Forwarded-For is ignored, every socket is the peer's (127.0.0.1).
    plain = await make_harness(max_pending_auth_per_address=1, auth_timeout_s=60)
    first = await _pending(http, plain, "192.0.2.1")
    assert await _refused_status(http, plain, "192.0.2.2") == 429
    await first.close()
    # Trusted (the test client plays nginx): the right-most entry is the client.
    proxied = await make_harness(
        max_pending_auth_per_address=1, auth_timeout_s=60, trusted_proxies="127.0.0.1"
    )
    one = await _pending(http, proxied, "192.0.2.1")
    two = await _pending(http, proxied, "192.0.2.2")
    # what a client wrote itself (left of the proxy's entry) is not believed
    assert await _refused_status(http, proxied, "198.51.100.7, 192.0.2.1") == 429
    for ws in (one, two):
        await ws.close()


async def test_joined_conversations_per_connection_are_capped(make_harness: MakeHarness) -> None:
    harness = await make_harness(max_joined=2)
    conversations = [await harness.conversation("alice") for _ in range(3)]
    alice = await harness.connect("alice")
    await alice.join(conversations[0])
    await alice.join(conversations[1])
    with pytest.raises(ChatError) as refused:
        await alice.join(conversations[2])
    assert refused.value.code == "rate_limited"
    assert "2 conversations" in refused.value.frame.message
    await alice.join(conversations[0])  # a re-join is not one more
    await alice.leave(conversations[1])
    await alice.join(conversations[2])
    # another connection of the same user has its own count
    other = await harness.connect("alice")
    await other.join(conversations[1])


async def test_typing_notices_are_coalesced(make_harness: MakeHarness) -> None:
    harness = await make_harness()  # the default: one per 300 ms
    conversation = await harness.conversation("alice", members=["bob"])
    alice = await harness.connect("alice")
    bob = await harness.connect("bob")
    await bob.join(conversation)
    started = time.monotonic()
    for _ in range(600):
        await alice.typing(conversation)
    await alice.ping()  # every typing frame before it was handled (one read loop)
    elapsed = time.monotonic() - started
    ack = await alice.send(conversation, "done typing")
    # Frames reach bob in the order they were published: every notice came before this.
    await bob.expect(MessageEvent, lambda f: f.message.id == ack.message_id)
    notices = [f for f in bob.pending() if isinstance(f, TypingNotice)]
    assert notices and all(n.user_id == "alice" for n in notices)
    assert len(notices) <= 2 + elapsed / 0.3, (len(notices), elapsed)
    # nothing came back to alice as an error for the dropped ones
    assert not [f for f in alice.pending() if getattr(f, "code", None)]


async def test_typing_coalescing_can_be_switched_off(make_harness: MakeHarness) -> None:
    harness = await make_harness(typing_interval_ms=0)
    conversation = await harness.conversation("alice", members=["bob"])
    alice = await harness.connect("alice")
    bob = await harness.connect("bob")
    await bob.join(conversation)
    for _ in range(5):
        await alice.typing(conversation)
    ack = await alice.send(conversation, "x")
    await bob.expect(MessageEvent, lambda f: f.message.id == ack.message_id)
    assert len([f for f in bob.pending() if isinstance(f, TypingNotice)]) == 5


async def _auth_result(harness: Harness, token: str) -> str:
    async with AsyncExitStack() as stack:
        http = await stack.enter_async_context(aiohttp.ClientSession())
        ws = await http.ws_connect(harness.ws_url, headers={"Authorization": f"Bearer {token}"})
        first = (await ws.receive(timeout=5)).data
        await ws.close()
        return "hello" if '"hello"' in first else first


async def test_audience_issuer_and_lifetime_are_checked(make_harness: MakeHarness) -> None:
    harness = await make_harness(
        jwt_secret=SECRET,
        jwt_audience="chat",
        jwt_issuer="https://id.example",
        jwt_max_lifetime_s=3600,
    )
    now = int(time.time())

    def signed(**claims: object) -> str:
        return jwt.encode({"sub": "alice", "iat": now, "exp": now + 60, **claims}, SECRET, "HS256")

    good = {"aud": "chat", "iss": "https://id.example"}
    assert await _auth_result(harness, signed(**good)) == "hello"
    issued = Authenticator(SECRET, audience="chat", issuer="https://id.example").issue("alice")
    assert await _auth_result(harness, issued) == "hello"
    assert await _auth_result(harness, signed(**good, exp=now + 3600)) == "hello"
    refused = {
        "no aud": signed(iss="https://id.example"),
        "other aud": signed(aud="mail", iss="https://id.example"),
        "no iss": signed(aud="chat"),
        "other iss": signed(aud="chat", iss="https://evil.example"),
        "too long": signed(**good, exp=now + 3601),
        "no iat, far exp": jwt.encode({"sub": "alice", "exp": now + 7200, **good}, SECRET),
        "no exp": jwt.encode({"sub": "alice", "iat": now, **good}, SECRET),
    }
    for name, token in refused.items():
        assert '"unauthorized"' in await _auth_result(harness, token), name


async def test_without_audience_a_token_with_aud_is_accepted(make_harness: MakeHarness) -> None:
    # An issuer may start adding aud before the servers are configured to check it.
    harness = await make_harness(jwt_secret=SECRET)
    now = int(time.time())
    token = jwt.encode({"sub": "alice", "exp": now + 60, "aud": "chat"}, SECRET, "HS256")
    assert await _auth_result(harness, token) == "hello"
    week = jwt.encode({"sub": "alice", "iat": now, "exp": now + 8 * 86400}, SECRET, "HS256")
    assert '"unauthorized"' in await _auth_result(harness, week)  # default cap: 7 days


def test_issue_stays_within_the_lifetime_cap() -> None:
    auth = Authenticator(SECRET, max_lifetime_s=60)
    claims = jwt.decode(auth.issue("alice", ttl_s=24 * 3600), SECRET, algorithms=["HS256"])
    assert claims["exp"] - claims["iat"] == 60
    assert auth.verify(auth.issue("alice", ttl_s=24 * 3600)).user_id == "alice"


async def test_a_client_connects_under_all_the_caps(make_harness: MakeHarness) -> None:
    harness = await make_harness(max_pending_auth=1, max_pending_auth_per_address=1)
    # sequential clients each pass the cap of one: the slot is freed at hello
    for _ in range(3):
        client = await ChatClient.connect(harness.ws_url, await harness.token("alice"))
        assert client.hello is not None
        await client.close()
