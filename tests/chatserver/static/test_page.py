"""End to end: Debian's Chromium (driven by Playwright) against a real ``chatserver serve``.

The page at ``/`` signs in (dev token, or ``#token=`` when dev auth is off), starts a
conversation, sends, renders the streamed reply, stops a reply mid-stream, reloads the
history, survives a server restart and loads older messages. Every wait is an auto-waiting
Playwright assertion with a deadline; nothing sleeps.
"""

from __future__ import annotations

import asyncio
import re

from playwright.async_api import Page, expect

from .pagekit import (
    FAST,
    REPLY_TIMEOUT_MS,
    SLOW,
    CuttableProxy,
    StartServer,
    exchange,
    expected_reply,
    finished_reply,
    issue_token,
    message,
    offsets,
    open_page,
    send,
    start_conversation,
)


async def test_send_streamed_reply_and_reload(start_server: StartServer, page: Page) -> None:
    server = start_server(FAST)
    await open_page(page, server.url + "/")
    await expect(page.get_by_text(re.compile(r"Signed in as web-"))).to_be_visible()
    await start_conversation(page, "Browser happy path")
    await expect(page.get_by_role("button", name="Stop", exact=True)).to_be_disabled()

    said = "hello from the browser"
    await exchange(page, said, 1)
    reply = finished_reply(page, 2)
    await expect(reply).not_to_have_attribute("data-finish-reason", re.compile(".*"))
    await expect(reply.locator(".finish")).to_have_count(0)
    await expect(page.locator("li.msg[data-streaming]")).to_have_count(0)
    await expect(page.get_by_role("button", name="Stop", exact=True)).to_be_disabled()
    assert await offsets(page) == [1, 2]  # the ack and the message frame render once

    # A reload reopens the last conversation and shows its history again.
    await page.reload()
    await expect(page.get_by_role("status")).to_have_text("Connected")
    await expect(page.get_by_role("heading", name="Browser happy path")).to_be_visible()
    await expect(message(page, "user", 1).locator(".text")).to_have_text(said)
    await expect(finished_reply(page, 2).locator(".text")).to_have_text(expected_reply(said))
    assert await offsets(page) == [1, 2]
    await expect(page.get_by_role("alert")).to_be_empty()


async def test_reload_mid_reply_resumes_the_stream(start_server: StartServer, page: Page) -> None:
    server = start_server(SLOW)
    await open_page(page, server.url + "/")
    await start_conversation(page, "Browser resume")
    said = " ".join(f"w{i}" for i in range(1, 13))
    await send(page, said)
    streaming = page.locator('li.msg[data-role="assistant"][data-streaming="true"]')
    await expect(streaming).to_contain_text("You said: w1", timeout=REPLY_TIMEOUT_MS)

    # Re-join while the reply streams: `joined.generation` then the live deltas, no gap or repeat.
    await page.reload()
    await expect(page.get_by_role("status")).to_have_text("Connected")
    await expect(streaming).to_contain_text("You said: w1", timeout=REPLY_TIMEOUT_MS)
    await expect(page.get_by_role("button", name="Stop", exact=True)).to_be_enabled()
    await expect(finished_reply(page, 2).locator(".text")).to_have_text(
        expected_reply(said), timeout=REPLY_TIMEOUT_MS
    )
    await expect(streaming).to_have_count(0)
    assert await offsets(page) == [1, 2]


async def test_stop_mid_reply_then_reload_shows_both_exchanges(
    start_server: StartServer, page: Page
) -> None:
    server = start_server(SLOW)
    await open_page(page, server.url + "/")
    await start_conversation(page, "Browser stop")
    stop = page.get_by_role("button", name="Stop", exact=True)

    first = "first question"
    await exchange(page, first, 1)
    await expect(stop).to_be_disabled()

    second = " ".join(f"word{i}" for i in range(1, 25))  # a reply of ~60 words, ~9 s at this pace
    full = expected_reply(second)
    await send(page, second)
    await expect(message(page, "user", 3).locator(".text")).to_have_text(second)
    streaming = page.locator('li.msg[data-role="assistant"][data-streaming="true"]')
    await expect(streaming).to_contain_text("You said: word1", timeout=REPLY_TIMEOUT_MS)
    await expect(stop).to_be_enabled()
    await stop.click()

    stopped = finished_reply(page, 4)
    await expect(stopped).to_have_attribute(
        "data-finish-reason", "cancelled", timeout=REPLY_TIMEOUT_MS
    )
    await expect(stopped.locator(".finish")).to_have_text("(stopped)")
    await expect(streaming).to_have_count(0)
    await expect(stop).to_be_disabled()
    partial = await stopped.locator(".text").inner_text()
    assert partial.startswith("You said: word1"), partial
    assert len(partial) < len(full) and full.startswith(partial.strip()), partial

    await page.reload()
    await expect(page.get_by_role("status")).to_have_text("Connected")
    await expect(message(page, "user", 1).locator(".text")).to_have_text(first)
    await expect(finished_reply(page, 2).locator(".text")).to_have_text(expected_reply(first))
    await expect(message(page, "user", 3).locator(".text")).to_have_text(second)
    await expect(finished_reply(page, 4).locator(".text")).to_have_text(partial)
    await expect(finished_reply(page, 4).locator(".finish")).to_have_text("(stopped)")
    assert await offsets(page) == [1, 2, 3, 4]
    await expect(stop).to_be_disabled()


async def test_reconnects_after_server_restart_and_loads_older(
    start_server: StartServer, page: Page
) -> None:
    # Two messages per fresh join: after the restart the window holds only the latest ones.
    server = start_server({**FAST, "CHAT_JOIN_MESSAGES": "2"})
    sockets: list[str] = []
    page.on("websocket", lambda ws: sockets.append(ws.url))
    await open_page(page, server.url + "/")
    await start_conversation(page, "Browser reconnect")
    await exchange(page, "one", 1)
    await exchange(page, "two", 3)
    await expect(page.get_by_role("button", name="Load older")).to_be_hidden()
    assert len(sockets) == 1

    # SIGTERM: the server sends `reconnect` and closes; a new process (new epoch) takes over.
    async with page.expect_event("websocket", timeout=REPLY_TIMEOUT_MS):
        await asyncio.to_thread(server.restart)
    await expect(page.get_by_role("status")).to_have_text("Connected", timeout=REPLY_TIMEOUT_MS)

    # Not recovered (new epoch): the page reloaded its window from `joined` (offsets 3..4).
    await expect(page.get_by_role("button", name="Load older")).to_be_visible()
    await exchange(page, "three", 5)
    assert await offsets(page) == [3, 4, 5, 6]

    await page.get_by_role("button", name="Load older").click()
    await expect(message(page, "user", 1).locator(".text")).to_have_text("one")
    await expect(finished_reply(page, 2).locator(".text")).to_have_text(expected_reply("one"))
    await expect(page.get_by_role("button", name="Load older")).to_be_hidden()
    assert await offsets(page) == [1, 2, 3, 4, 5, 6]
    assert all("token" not in url for url in sockets), sockets


async def test_dropped_connection_rejoins_since_last_offset(
    start_server: StartServer, page: Page
) -> None:
    server = start_server(SLOW)
    proxy = await CuttableProxy(server.port).start()
    try:
        sockets: list[str] = []
        page.on("websocket", lambda ws: sockets.append(ws.url))
        status = page.get_by_role("status")
        await open_page(page, proxy.url + "/")
        await start_conversation(page, "Browser dropped link")
        await exchange(page, "before the cut", 1)

        long_text = " ".join(f"w{i}" for i in range(1, 21))
        await send(page, long_text)
        streaming = page.locator('li.msg[data-role="assistant"][data-streaming="true"]')
        await expect(streaming).to_contain_text("You said: w1", timeout=REPLY_TIMEOUT_MS)

        # The network goes away mid-reply; a message typed meanwhile waits for the link.
        proxy.accepting = False
        proxy.cut()
        await expect(status).to_contain_text("Reconnecting")
        await expect(page.get_by_role("button", name="Stop", exact=True)).to_be_disabled()
        await send(page, "sent while offline")
        pending = page.locator("li.msg[data-pending]")
        await expect(pending).to_have_count(1)
        await expect(pending).to_contain_text("sent while offline")

        # Back: re-join with `since` (same epoch: recovered), the stream resumes without a gap
        # or a repeat, and the waiting message goes out once (its client_msg_id is kept).
        proxy.accepting = True
        await expect(status).to_have_text("Connected", timeout=REPLY_TIMEOUT_MS)
        await expect(pending).to_have_count(0, timeout=REPLY_TIMEOUT_MS)
        await expect(message(page, "user", 4).locator(".text")).to_have_text("sent while offline")
        await expect(finished_reply(page, 5).locator(".text")).to_have_text(
            expected_reply(long_text), timeout=REPLY_TIMEOUT_MS
        )
        await expect(finished_reply(page, 6).locator(".text")).to_have_text(
            expected_reply("sent while offline"), timeout=REPLY_TIMEOUT_MS
        )
        assert await offsets(page) == [1, 2, 3, 4, 5, 6]
        assert len(sockets) >= 2, sockets
    finally:
        await proxy.close()


async def test_token_from_url_fragment_when_dev_auth_is_off(
    start_server: StartServer, page: Page
) -> None:
    secret = "browser-test-secret-" + "x" * 32
    server = start_server({"CHAT_JWT_SECRET": secret})
    sockets: list[str] = []
    page.on("websocket", lambda ws: sockets.append(ws.url))

    # No dev route and no token: the page says what to do.
    await page.goto(server.url + "/")
    await expect(page.get_by_role("alert")).to_contain_text("#token=")
    await expect(page.get_by_role("textbox", name="Message", exact=True)).to_be_disabled()

    token = await issue_token(secret, "alice")
    await page.goto("about:blank")
    await page.goto(f"{server.url}/#token={token}")
    await expect(page.get_by_role("status")).to_have_text("Connected")
    await expect(page.get_by_text("Signed in as alice")).to_be_visible()
    assert token not in page.url  # taken out of the address bar
    await start_conversation(page, "Fragment token")
    await exchange(page, "hi from alice", 1)
    assert sockets and all("token" not in url for url in sockets), sockets
