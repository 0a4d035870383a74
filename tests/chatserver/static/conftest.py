"""Fixtures of the Chromium tests: ``chatserver serve`` processes, Debian's Chromium, a page."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, Page, async_playwright

from tests.serverproc import ServerProc

from .pagekit import CHROMIUM, CHROMIUM_ARGS, StartServer


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[StartServer]:
    """Start ``chatserver serve`` processes; each is stopped with SIGTERM at teardown."""
    servers: list[ServerProc] = []

    def start(env: dict[str, str] | None = None, args: tuple[str, ...] = ()) -> ServerProc:
        server = ServerProc(tmp_path / f"server{len(servers)}", env=env, args=args)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        code = server.stop()
        # Shown by pytest when the test failed: what the server logged.
        print(f"--- server on port {server.port} exited with {code}:\n{server.output[-3000:]}")
        server.close()


@pytest.fixture
def chromium() -> str:
    """Debian's Chromium: Playwright drives it; no browser is downloaded."""
    assert os.access(CHROMIUM, os.X_OK), f"{CHROMIUM} is missing: apt-get install chromium"
    return CHROMIUM


@pytest.fixture
async def browser(chromium: str) -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=chromium, headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield browser
        finally:
            await browser.close()


@pytest.fixture
async def page(browser: Browser) -> AsyncIterator[Page]:
    """A fresh context (empty localStorage) whose page must raise no uncaught error."""
    context = await browser.new_context(viewport={"width": 1200, "height": 800})
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: print(f"console.{msg.type}: {msg.text}"))
    try:
        yield page
    finally:
        await context.close()
    assert errors == [], f"uncaught errors in the page: {errors}"
