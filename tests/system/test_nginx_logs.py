"""The shipped nginx configuration keeps tokens out of its access log."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp

from chatclient.client import ChatApi
from tests.serverproc import ServerProc

from .nginxproc import NginxProc


async def test_the_access_log_has_paths_without_their_query(tmp_path: Path) -> None:
    server = ServerProc(tmp_path)
    server.start()
    try:
        with NginxProc([f"127.0.0.1:{server.port}"]) as lb:
            async with aiohttp.ClientSession() as http:
                api = ChatApi(server.url, None, http)
                token = await api.dev_token("alice")
                async with http.ws_connect(f"{lb.ws_url}?token={token}") as ws:
                    hello = await ws.receive_json(timeout=10)
                    assert hello["type"] == "hello" and hello["user_id"] == "alice"
                async with http.get(f"{lb.url}/api/agents?token={token}&x=1") as resp:
                    assert resp.status == 401  # REST takes no query-string token
            # nginx logs a WebSocket when both sides have closed, and any request after its
            # response has left: wait for both lines.
            wanted = {"GET /ws HTTP/1.1", "GET /api/agents HTTP/1.1"}
            deadline = time.monotonic() + 10
            while True:
                lines = lb.access_log()
                requests = [line.request for line in lines]
                if wanted <= set(requests) or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)
            assert "GET /ws HTTP/1.1" in requests
            assert "GET /api/agents HTTP/1.1" in requests
            assert all(token not in line.raw and "?" not in line.request for line in lines)
    finally:
        server.stop()
