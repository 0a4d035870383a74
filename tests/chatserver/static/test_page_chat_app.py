"""The page as an end user meets it, in Debian's Chromium against a real ``chatserver serve``:
typing on an empty page starts a conversation, Enter sends and Shift+Enter adds a line,
replies render as Markdown with untrusted HTML left as text, a refused send says why and when
to retry, and who else is online shows in the header."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import aiohttp
import pytest
from playwright.async_api import Browser, Page, expect

from chatclient.client import ChatApi
from tests.fakegemini import FakeGemini, Stream

from .pagekit import (
    FAST,
    REPLY_TIMEOUT_MS,
    StartServer,
    expected_reply,
    finished_reply,
    message,
    open_page,
)

MARKDOWN_REPLY = [
    "Here is some code:\n\n```python\nprint('hi')\n",
    "x = 1 < 2\n```\n\n",
    "- first item\n- second **item**\n\n",
    "A [link](https://example.com/docs) and ",
    "<script>window.pwned = 1</script> and <b>not bold</b> and ",
    '<img src=x onerror="window.pwned = 2">.',
]


def composer(page: Page):  # type: ignore[no-untyped-def]
    return page.get_by_role("textbox", name="Message", exact=True)


async def test_typing_on_an_empty_page_starts_a_conversation(
    start_server: StartServer, page: Page
) -> None:
    server = start_server(FAST)
    await open_page(page, server.url + "/")
    await expect(page.get_by_label("Agent")).to_contain_text("General assistant")
    await expect(page.locator("#chat-title")).to_have_text("New chat")
    box = composer(page)
    await expect(box).to_be_enabled()  # no "Start conversation" needed first
    await expect(box).to_have_attribute("placeholder", "Message General assistant")
    await page.get_by_label("Agent").select_option(label="Health coach")
    await expect(box).to_have_attribute("placeholder", "Message Health coach")

    said = "plan a weekend in Lisbon"
    await box.fill(said)
    await box.press("Enter")
    await expect(box).to_have_value("")
    # the conversation exists, titled after the message, with the selected agent
    await expect(page.get_by_role("heading", name=said)).to_be_visible()
    await expect(page.get_by_text("with Health coach")).to_be_visible()
    await expect(page.get_by_role("button", name=re.compile(re.escape(said)))).to_be_visible()
    await expect(message(page, "user", 1).locator(".text")).to_have_text(said)
    await expect(finished_reply(page, 2).locator(".text")).to_have_text(
        expected_reply(said), timeout=REPLY_TIMEOUT_MS
    )
    await expect(page.locator("li.msg")).to_have_count(2)


async def test_enter_sends_and_shift_enter_adds_a_line(
    start_server: StartServer, page: Page
) -> None:
    server = start_server(FAST)
    await open_page(page, server.url + "/")
    await expect(page.get_by_label("Agent")).to_contain_text("General assistant")
    box = composer(page)
    await box.click()
    await page.keyboard.type("line one")
    await page.keyboard.press("Shift+Enter")
    await page.keyboard.type("line two")
    await expect(box).to_have_value("line one\nline two")
    await expect(page.locator("li.msg")).to_have_count(0)  # nothing sent yet
    await page.keyboard.press("Enter")
    await expect(box).to_have_value("")
    user = message(page, "user", 1).locator(".text")
    await expect(user).to_have_text("line one\nline two")
    assert await user.evaluate("e => e.textContent") == "line one\nline two"


@pytest.fixture
async def gemini() -> AsyncIterator[FakeGemini]:
    server = FakeGemini(Stream(MARKDOWN_REPLY, pace_s=0.05))
    await server.start()
    yield server
    await server.close()


async def test_a_reply_renders_as_markdown_and_html_in_it_stays_text(
    start_server: StartServer, page: Page, gemini: FakeGemini
) -> None:
    server = start_server(
        {"CHAT_GEMINI_API_KEY": "test-key", "CHAT_GEMINI_BASE_URL": gemini.base_url}
    )
    await open_page(page, server.url + "/")
    await expect(page.get_by_label("Agent")).to_contain_text("General assistant")
    await composer(page).fill("show me some markdown")
    await composer(page).press("Enter")
    reply = finished_reply(page, 2).locator(".text")
    await expect(reply).to_contain_text("not bold", timeout=REPLY_TIMEOUT_MS)

    code = reply.locator("pre > code")
    await expect(code).to_have_count(1)
    assert await code.evaluate("e => e.textContent") == "print('hi')\nx = 1 < 2\n"
    await expect(reply.locator("ul > li")).to_have_count(2)
    await expect(reply.locator("ul > li").nth(1).locator("strong")).to_have_text("item")
    link = reply.locator("a")
    await expect(link).to_have_count(1)
    await expect(link).to_have_text("link")
    await expect(link).to_have_attribute("href", "https://example.com/docs")
    await expect(link).to_have_attribute("rel", "noopener noreferrer nofollow")
    # the model's HTML is shown as the text it is: no element, nothing run
    await expect(reply).to_contain_text("<script>window.pwned = 1</script>")
    await expect(reply).to_contain_text("<b>not bold</b>")
    await expect(reply).to_contain_text('<img src=x onerror="window.pwned = 2">')
    assert await reply.locator("script, b, img").count() == 0
    assert await page.locator("#messages script").count() == 0
    assert await page.evaluate("window.pwned") is None

    # the same after a reload (from the stored message, not the stream)
    await page.reload()
    await expect(page.get_by_role("status")).to_have_text("Connected")
    stored = finished_reply(page, 2).locator(".text")
    await expect(stored.locator("pre > code")).to_have_count(1)
    await expect(stored).to_contain_text("<script>window.pwned = 1</script>")
    assert await stored.locator("script, b, img").count() == 0
    assert await page.evaluate("window.pwned") is None


async def test_a_refused_send_says_why_and_when_to_retry(
    start_server: StartServer, page: Page
) -> None:
    limits = "messages_per_minute=1,connections=5,daily_tokens=100000"
    server = start_server({**FAST, "CHAT_LIMITS_FREE": limits})
    await open_page(page, server.url + "/")
    await expect(page.get_by_label("Agent")).to_contain_text("General assistant")
    await composer(page).fill("first")
    await composer(page).press("Enter")
    await expect(finished_reply(page, 2)).to_be_visible(timeout=REPLY_TIMEOUT_MS)

    await composer(page).fill("second, too soon")
    await composer(page).press("Enter")
    failed = page.locator('li.msg[data-failed="true"]')
    await expect(failed).to_have_count(1)
    await expect(failed).to_have_attribute("data-error-code", "rate_limited")
    await expect(failed.locator(".text")).to_have_text("second, too soon")
    await expect(failed.locator(".refusal-why")).to_have_text(
        "Too many messages: at most 1 messages per minute."
    )
    await expect(failed.locator(".refusal-when")).to_have_text(
        re.compile(r"^You can retry in \d+ s\.$")
    )
    await expect(failed.get_by_role("button", name="Retry")).to_be_disabled()
    await expect(page.get_by_role("alert")).to_contain_text("Message not sent. Too many messages")
    await expect(page.locator("li.msg[data-pending]")).to_have_count(0)


async def test_the_header_shows_who_else_is_online(
    start_server: StartServer, browser: Browser
) -> None:
    server = start_server(FAST)
    async with aiohttp.ClientSession() as http:
        token = await ChatApi(server.url, None, http).dev_token("web-alice")
        api = ChatApi(server.url, token, http)
        conv = str((await api.create_conversation(title="Together", members=["web-bob"]))["id"])
    pages: dict[str, Page] = {}
    contexts = []
    try:
        for user in ("web-alice", "web-bob"):
            context = await browser.new_context()
            contexts.append(context)
            # the page's dev sign-in reuses this id, and reopens this conversation
            await context.add_init_script(
                f"localStorage.setItem('chat.userId', '{user}');"
                f"localStorage.setItem('chat.lastConversation', '{conv}');"
            )
            pages[user] = await context.new_page()
        alice, bob = pages["web-alice"], pages["web-bob"]
        await open_page(alice, server.url + "/")
        await expect(alice.get_by_role("heading", name="Together")).to_be_visible()
        await expect(alice.locator("#presence")).to_have_text("Only you are here")
        await open_page(bob, server.url + "/")
        await expect(bob.locator("#presence")).to_have_text("Online: web-alice")
        await expect(alice.locator("#presence")).to_have_text("Online: web-bob")
        await bob.close()
        await expect(alice.locator("#presence")).to_have_text("Only you are here")
    finally:
        for context in contexts:
            await context.close()


async def test_a_send_past_the_daily_quota_says_when_it_resets(
    start_server: StartServer, page: Page
) -> None:
    limits = "messages_per_minute=100,connections=5,daily_tokens=1"
    server = start_server({**FAST, "CHAT_LIMITS_FREE": limits})
    await open_page(page, server.url + "/")
    await expect(page.get_by_label("Agent")).to_contain_text("General assistant")
    await composer(page).fill("first")
    await composer(page).press("Enter")
    await expect(finished_reply(page, 2)).to_be_visible(timeout=REPLY_TIMEOUT_MS)

    await composer(page).fill("over the quota")
    await composer(page).press("Enter")
    failed = page.locator('li.msg[data-failed="true"]')
    await expect(failed).to_have_attribute("data-error-code", "quota_exceeded")
    await expect(failed.locator(".refusal-why")).to_have_text(
        "Daily limit reached: daily quota of 1 model tokens used up. It resets at midnight UTC."
    )
    await expect(failed.locator(".refusal-when")).to_have_text(
        re.compile(r"^You can retry in (\d+ s|\d+ min|\d+ h \d+ min)\.$")
    )
    await expect(failed.get_by_role("button", name="Retry")).to_be_disabled()
