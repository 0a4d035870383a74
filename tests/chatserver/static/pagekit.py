"""What the Chromium tests of the browser client share: the server process, a cuttable
link, the local model's answer, and locators and steps of the page. The fixtures (a server,
Debian's Chromium driven by Playwright, a page) are in conftest.py beside this file."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from collections.abc import Callable

from playwright.async_api import Locator, Page, expect

from tests.serverproc import REPO_ROOT, ServerProc

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
REPLY_TIMEOUT_MS = 20_000
FAST = {"CHAT_LOCAL_TTFT_MS": "50", "CHAT_LOCAL_TOKEN_MS": "5"}
SLOW = {"CHAT_LOCAL_TTFT_MS": "100", "CHAT_LOCAL_TOKEN_MS": "150"}

StartServer = Callable[..., ServerProc]


class CuttableProxy:
    """A TCP proxy in front of the server whose connections the test can drop at will."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.accepting = True
        self.port = 0
        self._server: asyncio.Server | None = None
        self._links: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> CuttableProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.accepting:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        link = (writer, up_writer)
        self._links.add(link)
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            self._links.discard(link)

    def cut(self) -> None:
        """Drop every open connection at once, as a network failure would."""
        for down, up in list(self._links):
            down.transport.abort()
            up.transport.abort()

    async def close(self) -> None:
        self.accepting = False
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.transport.abort()


def expected_reply(said: str) -> str:
    """The local model's deterministic answer (chatserver/generation/local.py)."""
    words = said.split()
    return (
        f"You said: {said} Backwards, that is: {' '.join(reversed(words))} "
        f"That was {len(words)} words and {len(said)} characters."
    )


def message(page: Page, role: str, offset: int) -> Locator:
    return page.locator(f'li.msg[data-role="{role}"][data-offset="{offset}"]')


def finished_reply(page: Page, offset: int) -> Locator:
    return page.locator(
        f'li.msg[data-role="assistant"][data-offset="{offset}"]:not([data-streaming])'
    )


async def open_page(page: Page, url: str) -> None:
    await page.goto(url)
    await expect(page.get_by_role("status")).to_have_text("Connected")


async def start_conversation(page: Page, title: str) -> None:
    await expect(page.get_by_label("Agent")).to_contain_text("General assistant")
    await page.get_by_label("Agent").select_option(label="General assistant")
    await page.get_by_label("Title").fill(title)
    await page.get_by_role("button", name="Start conversation").click()
    await expect(page.get_by_role("heading", name=title)).to_be_visible()
    await expect(page.get_by_role("button", name=re.compile(re.escape(title)))).to_be_visible()


async def send(page: Page, text: str) -> None:
    box = page.get_by_role("textbox", name="Message", exact=True)
    await box.fill(text)
    await page.get_by_role("button", name="Send", exact=True).click()
    await expect(box).to_have_value("")


async def exchange(page: Page, text: str, user_offset: int) -> None:
    """Send ``text`` and wait for the whole reply, rendered once each."""
    await send(page, text)
    await expect(message(page, "user", user_offset).locator(".text")).to_have_text(text)
    await expect(finished_reply(page, user_offset + 1).locator(".text")).to_have_text(
        expected_reply(text), timeout=REPLY_TIMEOUT_MS
    )


async def issue_token(secret: str, user: str) -> str:
    """A client token from ``chatserver token`` (the CLI an operator would use)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "chatserver",
        "token",
        "--user",
        user,
        env={**os.environ, "CHAT_JWT_SECRET": secret},
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=30)
    assert proc.returncode == 0, err.decode()
    return out.decode().strip()


async def offsets(page: Page) -> list[int]:
    values = await page.locator("li.msg").evaluate_all("els => els.map(e => e.dataset.offset)")
    return [int(v) for v in values]
