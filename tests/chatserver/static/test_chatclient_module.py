"""static/chatclient.js driven directly in Debian's Chromium (Playwright), against a real
``chatserver serve``: no page code in between, only the module's API.

The module is imported into a document of the server's own origin (``/healthz``), so the
page's Content-Security-Policy applies to it as it would to an application.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from playwright.async_api import Page, WebSocket

from chatclient.client import ChatApi
from chatserver.auth import Authenticator

from .pagekit import (
    FAST,
    REPLY_TIMEOUT_MS,
    SLOW,
    CuttableProxy,
    StartServer,
    expected_reply,
)

WAIT_MS = 20_000
SECRET = "browser-module-test-secret-" + "x" * 32


async def _token(base_url: str, user: str) -> str:
    async with aiohttp.ClientSession() as http:
        return await ChatApi(base_url, None, http).dev_token(user)


async def _conversation(base_url: str, owner: str, members: list[str] | None = None) -> str:
    async with aiohttp.ClientSession() as http:
        api = ChatApi(base_url, await ChatApi(base_url, None, http).dev_token(owner), http)
        return str((await api.create_conversation(members=members))["id"])


async def load_module(page: Page, base_url: str, token: str, **options: Any) -> None:
    """``window.client``: a ChatClient; ``window.seen``: what it reported, in order."""
    await page.goto(base_url + "/healthz")
    await page.evaluate(
        """async ([token, options]) => {
          const mod = await import("/static/chatclient.js");
          window.mod = mod;
          window.seen = [];
          window.replies = [];
          const client = new mod.ChatClient({ token, ...options });
          for (const type of ["open", "close", "reconnecting", "reconnect", "joined", "ack",
                              "message", "gen_end", "presence", "error", "fatal"]) {
            client.addEventListener(type, (e) => {
              const d = e.detail;
              window.seen.push({ type, detail: d instanceof Error
                ? { code: d.code, message: d.message } : JSON.parse(JSON.stringify(d)) });
            });
          }
          client.addEventListener("reply", (e) => {
            const stream = e.detail;
            const record = { id: stream.generationId, seqs: [], pieces: [], text: "", end: null };
            window.replies.push(record);
            stream.addEventListener("delta", (d) => {
              record.seqs.push(d.detail.seq);
              record.pieces.push(d.detail.delta);
              record.text = d.detail.text;
            });
            stream.addEventListener("end", (d) => { record.end = d.detail; });
          });
          window.client = client;
        }""",
        [token, options],
    )


async def until(page: Page, predicate: str, timeout: int = WAIT_MS) -> Any:
    """Wait for a JS expression over ``window`` to be truthy; return its value."""
    handle = await page.wait_for_function(f"() => {predicate}", timeout=timeout)
    return await handle.json_value()


def frames_sent(page: Page) -> list[str]:
    """Every frame the page's WebSockets send, as text."""
    sent: list[str] = []

    def on_socket(ws: WebSocket) -> None:
        ws.on("framesent", lambda payload: sent.append(str(payload)))

    page.on("websocket", on_socket)
    return sent


async def test_connect_join_send_and_a_streamed_reply(
    start_server: StartServer, page: Page
) -> None:
    server = start_server(FAST)
    conv = await _conversation(server.url, "ann")
    await load_module(page, server.url, await _token(server.url, "ann"))
    hello = await page.evaluate("client.connect()")
    assert hello["type"] == "hello" and hello["user_id"] == "ann"
    joined = await page.evaluate("(c) => client.join(c)", conv)
    assert joined["type"] == "joined" and joined["offset"] == 0
    assert await page.evaluate("(c) => client.since(c)", conv) == {
        "offset": 0,
        "epoch": joined["epoch"],
    }
    ack = await page.evaluate(
        "(c) => client.send(c, 'hello from the module', {clientMsgId: 'm-1'})", conv
    )
    assert ack["client_msg_id"] == "m-1" and ack["offset"] == 1 and ack["duplicate"] is False
    reply = await until(page, "window.replies[0]?.end && window.replies[0]", REPLY_TIMEOUT_MS)
    assert reply["end"]["finish_reason"] == "stop"
    assert (
        reply["text"] == reply["end"]["message"]["text"] == expected_reply("hello from the module")
    )
    assert reply["seqs"] == list(range(1, len(reply["seqs"]) + 1))  # each once, in order
    assert await page.evaluate("(c) => client.since(c).offset", conv) == 2
    presence = await page.evaluate("seen.filter(e => e.type === 'presence').map(e => e.detail)")
    assert presence[0] == {"type": "presence", "conversation_id": conv, "online": ["ann"]}
    history = await page.evaluate("(c) => client.history(c, {limit: 10})", conv)
    assert [m["offset"] for m in history["messages"]] == [1, 2]
    pong = await page.evaluate("client.ping('p-1')")
    assert pong["ts"] == "p-1"


async def test_cancel_a_reply_mid_stream(start_server: StartServer, page: Page) -> None:
    server = start_server(SLOW)
    conv = await _conversation(server.url, "ann")
    await load_module(page, server.url, await _token(server.url, "ann"))
    await page.evaluate("client.connect()")
    await page.evaluate("(c) => client.join(c)", conv)
    long_text = " ".join(f"w{i}" for i in range(40))
    await page.evaluate("([c, t]) => client.send(c, t)", [conv, long_text])
    await until(page, "window.replies[0]?.seqs.length >= 3", REPLY_TIMEOUT_MS)
    end = await page.evaluate("client.reply(window.replies[0].id).cancel()")
    assert end["finish_reason"] == "cancelled"
    assert end["message"]["text"] == await page.evaluate("window.replies[0].text")
    assert len(end["message"]["text"]) < len(expected_reply(long_text))
    # a cancel of a reply that is over is answered, not left waiting
    assert await page.evaluate("client.cancel(window.replies[0].id)") is None


async def test_a_connection_dropped_mid_reply_resumes_without_gap_or_repeat(
    start_server: StartServer, page: Page
) -> None:
    server = start_server(SLOW)
    proxy = await CuttableProxy(server.port).start()
    try:
        conv = await _conversation(server.url, "ann")
        sent = frames_sent(page)
        await load_module(
            page,
            server.url,
            await _token(server.url, "ann"),
            url=f"ws://127.0.0.1:{proxy.port}/ws",
            backoff={"baseMs": 100, "maxMs": 400},
        )
        await page.evaluate("client.connect()")
        joined = await page.evaluate("(c) => client.join(c)", conv)
        long_text = " ".join(f"w{i}" for i in range(20))
        await page.evaluate(
            "([c, t]) => client.send(c, t, {clientMsgId: 'long'})", [conv, long_text]
        )
        await until(page, "window.replies[0]?.seqs.length >= 3", REPLY_TIMEOUT_MS)

        # the network goes away mid-reply; a message sent meanwhile waits in the module
        proxy.accepting = False
        proxy.cut()
        await until(page, "seen.some(e => e.type === 'reconnecting')")
        assert await page.evaluate("client.state") == "connecting"
        await page.evaluate(
            "(c) => { window.offline = client.send(c, 'sent while offline', "
            "{clientMsgId: 'offline-1'}); }",
            conv,
        )
        assert await page.evaluate("client.unacked.map(s => s.clientMsgId)") == ["offline-1"]
        since = await page.evaluate("(c) => client.since(c)", conv)
        assert since["epoch"] == joined["epoch"] and since["offset"] >= 1

        # back: a rejoin with since (recovered), the stream goes on, the send goes out once
        proxy.accepting = True
        ack = await page.evaluate("window.offline")
        assert ack["client_msg_id"] == "offline-1" and ack["duplicate"] is False
        reply = await until(page, "window.replies[0]?.end && window.replies[0]", REPLY_TIMEOUT_MS)
        assert reply["end"]["finish_reason"] == "stop"
        assert reply["text"] == reply["end"]["message"]["text"] == expected_reply(long_text)
        # No repeat, no gap: the pieces add up to the text, seqs only go up. The rejoin's
        # snapshot may stand for several seqs at once (those streamed while cut off).
        assert "".join(reply["pieces"]) == reply["text"]
        assert reply["seqs"] == sorted(set(reply["seqs"])), reply["seqs"]
        second = await until(page, "window.replies[1]?.end && window.replies[1]", REPLY_TIMEOUT_MS)
        assert second["end"]["message"]["text"] == expected_reply("sent while offline")

        rejoined = [e for e in await page.evaluate("seen") if e["type"] == "joined"][-1]
        assert rejoined["detail"]["recovered"] is True
        joins = [f for f in sent if '"type":"join"' in f]
        assert len(joins) >= 2 and '"since":{"offset":' in joins[-1], joins
        sends = [f for f in sent if '"client_msg_id":"offline-1"' in f]
        assert len(sends) == 1, sends  # kept while offline, sent once after the rejoin
        history = await page.evaluate("(c) => client.history(c, {limit: 10})", conv)
        texts = [m["text"] for m in history["messages"] if m["role"] == "user"]
        assert texts == [long_text, "sent while offline"]
    finally:
        await proxy.close()


async def test_reconnect_frame_sets_the_delay_then_backoff_between_failures(
    start_server: StartServer, page: Page
) -> None:
    # A configured secret: the token outlives the restart (a dev-mode one would not)
    server = start_server({**FAST, "CHAT_JWT_SECRET": SECRET})
    proxy = await CuttableProxy(server.port).start()
    try:
        token = Authenticator(SECRET).issue("ann", ttl_s=600)
        async with aiohttp.ClientSession() as http:
            conv = str((await ChatApi(server.url, token, http).create_conversation())["id"])
        await load_module(
            page,
            server.url,
            token,
            url=f"ws://127.0.0.1:{proxy.port}/ws",
            backoff={"baseMs": 100, "maxMs": 400},
        )
        await page.evaluate("client.connect()")
        await page.evaluate("(c) => client.join(c)", conv)

        # SIGTERM: `reconnect` with after_ms, close 1001; the module waits that long (and
        # jitter), then finds nobody there and backs off: capped, doubling, jittered
        proxy.accepting = False
        await asyncio.to_thread(server.stop)
        await until(page, "seen.filter(e => e.type === 'reconnecting').length >= 5", WAIT_MS)
        events = await page.evaluate("seen")
        told = next(e["detail"] for e in events if e["type"] == "reconnect")
        waits = [e["detail"] for e in events if e["type"] == "reconnecting"]
        assert waits[0]["reason"] == "server"
        assert told["after_ms"] <= waits[0]["delayMs"] <= told["after_ms"] + 250
        for wait in waits[1:5]:
            ceiling = min(400, 100 * 2 ** (wait["attempt"] - 1))
            assert wait["reason"] == "backoff"
            assert ceiling / 2 <= wait["delayMs"] <= ceiling, wait
        assert [w["attempt"] for w in waits[1:5]] == [2, 3, 4, 5]

        # the server back: connected again, the conversation rejoined
        server.start()
        proxy.accepting = True
        await until(page, "client.state === 'open'", WAIT_MS)
        assert await page.evaluate("client.attempts") == 0
        # `open` comes before the rejoin's `joined`: wait for that frame, not the state
        await until(page, "seen.filter(e => e.type === 'joined').length >= 2", WAIT_MS)
        rejoined = [e for e in await page.evaluate("seen") if e["type"] == "joined"]
        assert len(rejoined) == 2
        assert rejoined[1]["detail"]["frame"]["conversation_id"] == conv
    finally:
        await proxy.close()


async def test_a_refused_send_says_why_and_when(start_server: StartServer, page: Page) -> None:
    server = start_server(
        {**FAST, "CHAT_LIMITS_FREE": "messages_per_minute=1,connections=5,daily_tokens=100000"}
    )
    conv = await _conversation(server.url, "ann")
    await load_module(page, server.url, await _token(server.url, "ann"))
    await page.evaluate("client.connect()")
    await page.evaluate("(c) => client.join(c)", conv)
    await page.evaluate("(c) => client.send(c, 'one')", conv)
    refused = await page.evaluate(
        """(c) => client.send(c, 'two', {clientMsgId: 'two'}).then(
             () => null,
             (e) => ({name: e.name, code: e.code, retryAfterMs: e.retryAfterMs, message: e.message}))""",
        conv,
    )
    assert refused["name"] == "ChatError" and refused["code"] == "rate_limited"
    assert 0 < refused["retryAfterMs"] <= 60_000
    assert "per minute" in refused["message"]
    assert await page.evaluate("client.unacked") == []  # a refusal is not resent


async def test_a_rejected_token_is_fatal_without_a_token_function(
    start_server: StartServer, page: Page
) -> None:
    server = start_server(FAST)
    await load_module(page, server.url, "not-a-jwt")
    error = await page.evaluate("client.connect().then(() => null, (e) => e.code)")
    assert error == "closed"
    fatal = [e for e in await page.evaluate("seen") if e["type"] == "fatal"]
    assert fatal and fatal[0]["detail"]["code"] == 4401
    assert await page.evaluate("client.state") == "closed"
