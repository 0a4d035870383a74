"""The real `chatserver serve` process: `make run`, SIGTERM drain, restart on the same file."""

from __future__ import annotations

import asyncio
import os
import re
import signal
from pathlib import Path

import aiohttp

from chatclient.client import ChatApi, ChatClient, Closed
from protocol import CloseCode, Delta, GenStart, Reconnect
from tests.serverproc import REPO_ROOT, ServerProc

LONG = " ".join(f"w{i}" for i in range(40))


async def test_make_run_serves_the_page_at_the_printed_url(tmp_path: Path) -> None:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("CHAT_") and k not in ("GEMINI_API_KEY", "GOOGLE_API_KEY")
    }
    proc = await asyncio.create_subprocess_exec(
        "make",
        "--no-print-directory",
        "run",
        f"ARGS=--port 0 --sqlite-path {tmp_path / 'run.sqlite3'}",
        cwd=REPO_ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        start_new_session=True,  # make and its child in one group, stopped together
    )
    try:
        assert proc.stdout is not None
        url = None
        for _ in range(200):  # make may print its own lines first
            line = (await asyncio.wait_for(proc.stdout.readline(), 120)).decode()
            found = re.search(r"(http://127\.0\.0\.1:\d+/)", line)
            if found:
                url = found.group(1)
                break
        assert url is not None, "make run printed no URL"
        async with aiohttp.ClientSession() as http, http.get(url) as resp:
            assert resp.status == 200
            page = await resp.text()
        assert "Message" in page and "<script" in page
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # make itself dies of the signal: no exit code
        await asyncio.wait_for(proc.wait(), 30)


async def test_sigterm_finishes_the_reply_tells_clients_and_keeps_everything(
    tmp_path: Path,
) -> None:
    server = ServerProc(tmp_path, env={"CHAT_LOCAL_TTFT_MS": "5", "CHAT_LOCAL_TOKEN_MS": "25"})
    server.start()
    try:
        async with aiohttp.ClientSession() as http:
            api = ChatApi(server.url, None, http)
            api.token = await api.dev_token("alice")
            conv = (await api.create_conversation())["id"]
            client = await ChatClient.connect(server.ws_url, api.token)
            await client.join(conv)
            ack = await client.send(conv, LONG)
            start = await client.expect(GenStart)
            await client.expect(Delta, lambda d: d.seq >= 3)
            assert server.proc is not None
            server.proc.send_signal(signal.SIGTERM)
            # The reply in flight still completes before the server lets go.
            reply = await client.follow(start.generation_id, start, timeout=30)
            assert reply.end is not None and reply.end.finish_reason == "stop"
            reconnect = await client.expect(Reconnect, timeout=30)
            assert reconnect.after_ms >= 0
            try:
                while True:
                    await client.next_frame(timeout=10)
            except Closed as closed:
                assert closed.code == CloseCode.GOING_AWAY
            await client.close()
            assert await asyncio.to_thread(server.proc.wait, 30) == 0

            server.start()  # same port, same SQLite file
            api.token = await api.dev_token("alice")  # dev secrets die with the process
            status, body = await api.request("GET", f"/api/conversations/{conv}/messages")
            assert status == 200
            assert [m["role"] for m in body["items"]] == ["user", "assistant"]
            assert body["items"][0]["id"] == ack.message_id
            assert body["items"][1]["finish_reason"] == "stop"
            assert body["items"][1]["text"].startswith(f"You said: {LONG}")
    finally:
        server.close()
