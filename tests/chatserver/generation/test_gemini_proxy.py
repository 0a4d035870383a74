"""Both transports reach Gemini through the proxy the standard variables name.

The fake Gemini serves HTTPS with a certificate of a throwaway CA (trusted through
``SSL_CERT_FILE``, as a TLS-inspecting proxy's CA would be); the proxy is a real process
(``tests/httpproxy.py``) that logs every tunnel it opens.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trustme

from tests.fakegemini import FakeGemini, Stream

from .conftest import MakeProvider, gemini_request, run_stream

_PROXY_VARIABLES = (
    "HTTPS_PROXY",
    "https_proxy",
    "HTTP_PROXY",
    "http_proxy",
    "ALL_PROXY",
    "all_proxy",
    "NO_PROXY",
    "no_proxy",
)


class Proxy:
    """The proxy process and the lines it logged."""

    def __init__(self, process: asyncio.subprocess.Process, url: str) -> None:
        self.process = process
        self.url = url
        self.lines: list[str] = []
        self._logged = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.process.stdout is not None
        while line := await self.process.stdout.readline():
            self.lines.append(line.decode().strip())
            self._logged.set()

    async def wait_for(self, line: str, timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while line not in self.lines:
                self._logged.clear()
                await self._logged.wait()

    async def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.process.terminate()
        await self.process.wait()
        await self._reader


@pytest.fixture
def tls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ssl.SSLContext:
    """The server side of a throwaway CA; clients trust it through ``SSL_CERT_FILE``."""
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(server)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
    for name in _PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return server


@pytest.fixture
async def fake(tls: ssl.SSLContext) -> AsyncIterator[FakeGemini]:
    """Overrides the plain one: ``make`` builds providers on this HTTPS fake."""
    server = FakeGemini()
    await server.start(ssl_context=tls)
    yield server
    await server.close()


_REPO = Path(__file__).resolve().parents[3]


@pytest.fixture
async def proxy() -> AsyncIterator[Proxy]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.httpproxy",
        "--port",
        "0",
        stdout=asyncio.subprocess.PIPE,
        cwd=_REPO,
    )
    assert process.stdout is not None
    async with asyncio.timeout(10):
        first = (await process.stdout.readline()).decode().strip()
    assert first.startswith("listening on "), first
    started = Proxy(process, "http://" + first.removeprefix("listening on "))
    yield started
    await started.stop()


async def test_https_proxy_carries_the_replies_and_the_probe(
    make: MakeProvider, fake: FakeGemini, proxy: Proxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    assert fake.base_url.startswith("https://")
    provider = make()
    fake.script(Stream(["through ", "the proxy"]))
    text, finish = await run_stream(provider, gemini_request("hi"))
    assert (text, finish.reason) == ("through the proxy", "stop"), finish.error
    tunnel = f"CONNECT 127.0.0.1:{fake.port}"
    await proxy.wait_for(tunnel)
    assert set(proxy.lines) == {tunnel}, "everything went through the tunnel"
    await provider.probe()
    assert fake.probes == 1 and provider.healthy()


async def test_without_the_variable_or_past_no_proxy_the_proxy_sees_nothing(
    make: MakeProvider, fake: FakeGemini, proxy: Proxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    direct = make()
    text, _ = await run_stream(direct, gemini_request("hi"))
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    bypassed = make()
    text_too, _ = await run_stream(bypassed, gemini_request("hi"))
    assert text == text_too != "" and len(fake.requests) == 2
    assert proxy.lines == []
