"""Hypothesis against a live server: random and mutated frames, both encodings; then REST
bodies, cursors and hostile MessagePack frames while a bystander pings.

Bounded by the example count. Whatever arrives, the server answers with errors or a
documented close (never 1011), REST never answers 5xx, and keeps serving others: the
bystander's ping round trips stay short while the fuzz runs (p99 under 25 ms, or four times
its p99 on the same server unfuzzed, on a busy machine). Each fuzz ends by checking, on its own, that the server still answers a member and printed
nothing but its own JSON log records, none of them an error: a plain-text traceback fails
it as an error record does.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatclient.client import ChatApi, ChatClient
from protocol import CLIENT_TYPES, CloseCode
from tests.serverproc import REPO_ROOT, ServerProc

from .fuzz_inputs import hostile_frames, pre_auth_frames, rest_bodies, rest_queries
from .scaleout import SECRET, token

ALLOWED_CLOSES = {
    CloseCode.NORMAL,
    CloseCode.POLICY_VIOLATION,
    CloseCode.MESSAGE_TOO_BIG,
    CloseCode.UNAUTHORIZED,
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    yield from _fuzz_server(tmp_path_factory.mktemp("fuzz"))


@pytest.fixture(scope="module")
def control(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    """A server like the fuzzed one that nobody fuzzes: its bystander, pinging at the same
    time, shows what the machine's other work does to a ping meanwhile."""
    yield from _fuzz_server(tmp_path_factory.mktemp("control"))


def _fuzz_server(path: Path) -> Iterator[ServerProc]:
    proc = ServerProc(
        path,
        env={
            "CHAT_JWT_SECRET": SECRET,
            "CHAT_LOCAL_TTFT_MS": "1",
            "CHAT_LOCAL_TOKEN_MS": "1",
            "CHAT_BAD_FRAME_LIMIT": "1000",
            "CHAT_LIMITS_FREE": "messages_per_minute=100000,connections=1000,daily_tokens=1000000000",
        },
    )
    proc.start()
    yield proc
    proc.close()


@pytest.fixture(scope="module")
def conversation(server: ServerProc) -> str:
    async def create() -> str:
        async with aiohttp.ClientSession() as http:
            api = ChatApi(server.url, token("fuzzer"), http)
            return str((await api.create_conversation(members=["bystander"]))["id"])

    return asyncio.run(create())


scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=80)
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)
field_names = st.sampled_from(
    [
        "type",
        "ref",
        "token",
        "conversation_id",
        "since",
        "client_msg_id",
        "text",
        "generation_id",
        "before",
        "limit",
        "ts",
        "offset",
        "epoch",
    ]
)


@st.composite
def frames(draw: st.DrawFn, conv: str) -> tuple[bool, bytes]:
    """(sent as text?, payload): valid-looking objects, mutations, and noise."""
    kind = draw(st.sampled_from(["object", "mutated", "noise"]))
    binary = draw(st.booleans())
    if kind == "noise":
        return (not binary, draw(st.binary(max_size=300)))
    obj: dict[str, Any] = {
        "type": draw(st.sampled_from(sorted(CLIENT_TYPES)) | st.text(max_size=10))
    }
    if draw(st.booleans()):
        obj["conversation_id"] = conv
    for name in draw(st.lists(field_names, max_size=5)):
        obj[name] = draw(values)
    try:
        data = msgpack.packb(obj, use_bin_type=True) if binary else json.dumps(obj).encode()
    except (ValueError, TypeError, OverflowError):
        data = b"{}"
    if kind == "mutated" and data:
        position = draw(st.integers(min_value=0, max_value=len(data) - 1))
        data = data[:position] + bytes([draw(st.integers(0, 255))]) + data[position + 1 :]
    return (not binary, data)


async def _barrage(server: ServerProc, sent: list[tuple[bool, bytes]]) -> int | None:
    """Send the frames, then a ping; the close code if the server closed, else None."""
    json_mode = sent[0][0]
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(
            server.ws_url,
            protocols=("chat.v1.json" if json_mode else "chat.v1.msgpack",),
            headers={"Authorization": f"Bearer {token('fuzzer')}"},
        )
        await ws.receive(timeout=10)  # hello
        for is_text, data in sent:
            if ws.closed:
                break
            if is_text:
                await ws._writer.send_frame(
                    data, aiohttp.WSMsgType.TEXT
                )  # raw bytes, even bad UTF-8
            else:
                await ws.send_bytes(data)
        if not ws.closed:
            if json_mode:
                await ws.send_str('{"type":"ping","ts":"end"}')
            else:
                await ws.send_bytes(msgpack.packb({"type": "ping", "ts": "end"}))
        while True:
            msg = await ws.receive(timeout=10)
            if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
                return ws.close_code
            if msg.type == aiohttp.WSMsgType.TEXT and '"ts":"end"' in msg.data:
                await ws.close()
                return None
            if (
                msg.type == aiohttp.WSMsgType.BINARY
                and msgpack.unpackb(msg.data).get("ts") == "end"
            ):
                await ws.close()
                return None


def test_random_and_mutated_frames(server: ServerProc, conversation: str) -> None:
    @settings(max_examples=120, deadline=None)
    @given(data=st.data())
    def barrage(data: st.DataObject) -> None:
        sent = data.draw(st.lists(frames(conversation), min_size=1, max_size=8))
        code = asyncio.run(_barrage(server, sent))
        assert code is None or code in ALLOWED_CLOSES, f"closed with {code}"
        assert code != CloseCode.INTERNAL_ERROR

    barrage()
    _serves_and_logged_no_crash(server, conversation)


BYSTANDER_P99_MS = 25.0
QUIET_WINDOW_S = 1.0
QUIET_FACTOR = 4.0  # how much worse than on a quiet server the fuzz may make it
# ... and than a server nobody fuzzes, pinged at the same time (the machine's load then)
CONTROL_FACTOR = 2.0
FUZZ_DEADLINE_S = 30.0
# Each fuzzing client sends at this pace (rate control, not synchronisation): a steady
# hostile stream, as the attack was (17 frames a second from each of 4 sockets), not
# a flood whose queue alone would delay the bystander on a machine of two shared cores.
PACE_S = 0.005


async def _rest_fuzz(server: ServerProc, conversation: str, seed: int) -> list[str]:
    """Bodies and query strings; every answer must be a documented 2xx/4xx, never 5xx."""
    bad: list[str] = []
    headers = {"Authorization": f"Bearer {token('fuzzer')}", "Content-Type": "application/json"}
    async with aiohttp.ClientSession(base_url=server.url, headers=headers) as http:
        for body in rest_bodies(seed):
            await asyncio.sleep(PACE_S)
            async with http.post("/api/conversations", data=body) as response:
                await response.read()
                if response.status not in (201, 400, 413, 429):
                    bad.append(f"POST {body[:60]!r}: {response.status}")
        for path, query in rest_queries(seed, conversation):
            await asyncio.sleep(PACE_S)
            async with http.get(path, params=query) as response:
                await response.read()
                if response.status not in (200, 400, 404, 429):
                    bad.append(f"GET {path} {str(query)[:60]}: {response.status}")
    return bad


async def _frames_fuzz(server: ServerProc, seed: int) -> list[str]:
    """Hostile MessagePack frames on an authenticated socket; then a ping must be answered."""
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(
            server.ws_url,
            protocols=("chat.v1.msgpack",),
            headers={"Authorization": f"Bearer {token('fuzzer')}"},
        )
        await ws.receive(timeout=10)  # hello
        for data in hostile_frames(seed):
            if ws.closed:
                break
            await asyncio.sleep(PACE_S)
            await ws.send_bytes(data)
        if not ws.closed:
            await ws.send_bytes(msgpack.packb({"type": "ping", "ts": "end"}))
        while True:
            msg = await ws.receive(timeout=10)
            if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
                code = ws.close_code
                return [] if code in ALLOWED_CLOSES else [f"frames: closed with {code}"]
            binary = msg.type is aiohttp.WSMsgType.BINARY
            if binary and msgpack.unpackb(msg.data).get("ts") == "end":
                await ws.close()
                return []


async def _pre_auth_fuzz(server: ServerProc) -> list[str]:
    """The would-be auth frame is the attack: each socket is refused with 4401."""
    bad = []
    async with aiohttp.ClientSession() as http:
        for data in pre_auth_frames():
            await asyncio.sleep(PACE_S)
            ws = await http.ws_connect(server.ws_url, protocols=("chat.v1.msgpack",))
            await ws.send_bytes(data)
            while (await ws.receive(timeout=10)).type not in (
                aiohttp.WSMsgType.CLOSE,
                aiohttp.WSMsgType.CLOSED,
            ):
                pass
            if ws.close_code not in (CloseCode.UNAUTHORIZED, CloseCode.MESSAGE_TOO_BIG):
                bad.append(f"pre-auth: closed with {ws.close_code}")
    return bad


def _start_bystander(server: ServerProc) -> subprocess.Popen[str]:
    bystander = subprocess.Popen(
        [sys.executable, "-m", "tests.system.bystander", server.ws_url, token("bystander"), "5"],
        cwd=REPO_ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert bystander.stdout is not None and bystander.stdin is not None
    assert bystander.stdout.readline().strip() == "ready"
    return bystander


def _p99(rtts: list[float]) -> float:
    ordered = sorted(rtts)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def _quiet_rtts(server: ServerProc) -> list[float]:
    """The bystander's pings over a window with no fuzz."""
    quiet = _start_bystander(server)
    try:
        time.sleep(QUIET_WINDOW_S)  # a measuring window, not a wait for an event
        return list(json.loads(quiet.communicate("stop\n", timeout=30)[0]))
    finally:
        quiet.kill()


def test_rest_cursors_and_msgpack_fuzz_leave_a_bystander_unharmed(
    server: ServerProc, control: ServerProc, conversation: str
) -> None:
    # The same bystander first on a quiet server, for a second: on a machine busy with other
    # work (the rest of the suite on the other workers) its p99 is the floor of what the fuzz
    # can be held to. The bound is 25 ms; the unbounded decoder gave ~150 ms.
    # Measured again after the fuzz: other work that started meanwhile raises the floor too.
    # And beside it, a bystander of the control server over the same window.
    quiet_rtts = _quiet_rtts(server)
    bystander = _start_bystander(server)
    beside = _start_bystander(control)
    try:

        async def fuzz() -> list[str]:
            async with asyncio.timeout(FUZZ_DEADLINE_S):
                found = await asyncio.gather(
                    *(_rest_fuzz(server, conversation, seed) for seed in range(2)),
                    *(_frames_fuzz(server, seed) for seed in range(2)),
                    _pre_auth_fuzz(server),
                )
            return [line for lines in found for line in lines]

        bad = asyncio.run(fuzz())
        rtts = sorted(json.loads(bystander.communicate("stop\n", timeout=30)[0]))
        control_rtts = json.loads(beside.communicate("stop\n", timeout=30)[0])
    finally:
        bystander.kill()
        beside.kill()
    assert bad == [], bad[:5]
    assert len(rtts) >= 30, f"the fuzz was over too soon to measure: {len(rtts)} pings"
    p99 = _p99(rtts)
    if p99 >= max(BYSTANDER_P99_MS, QUIET_FACTOR * _p99(quiet_rtts)):
        quiet_rtts = max(quiet_rtts, _quiet_rtts(server), key=_p99)
    bound = max(
        BYSTANDER_P99_MS,
        QUIET_FACTOR * _p99(quiet_rtts),
        CONTROL_FACTOR * _p99(control_rtts),
    )
    assert p99 < bound, (
        f"bystander ping p99 {p99:.1f} ms over {len(rtts)} pings (quiet: "
        f"{_p99(quiet_rtts):.1f} ms; unfuzzed server meanwhile: {_p99(control_rtts):.1f} ms; "
        f"bound {bound:.1f} ms)"
    )
    _serves_and_logged_no_crash(server, conversation)


def crashes_logged(output: str) -> list[str]:
    """The lines of a server's output that tell of a crash, or that are not its log at all.

    The server writes one JSON object a line (stdout and stderr alike): a line that is not
    one (a plain traceback from a thread or the interpreter, a C library's complaint) is as
    much a sign of a failure nobody handled as an error record.
    """
    bad = []
    for line in output.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            bad.append(line)
            continue
        if not isinstance(record, dict) or record.get("level") in ("error", "critical"):
            bad.append(line)
    return bad


def _serves_and_logged_no_crash(server: ServerProc, conversation: str) -> None:
    """After a fuzz: the server still runs, answers a member with a whole reply, and its
    output so far holds nothing but its own log records, none of an error."""

    async def bystander() -> None:
        client = await ChatClient.connect(server.ws_url, token("bystander"))
        try:
            await client.join(conversation)
            ack = await client.send(conversation, "still here")
            reply = await client.reply(ack.message_id)
            assert reply.end is not None and reply.end.finish_reason == "stop"
        finally:
            await client.close()

    assert server.running, server.output[-3000:]
    asyncio.run(bystander())
    bad = crashes_logged(server.output)
    assert bad == [], bad[:5]


def test_the_crash_check_sees_a_plain_traceback() -> None:
    record = json.dumps({"level": "info", "event": "connection opened"})
    assert crashes_logged(record) == []
    traceback = 'Traceback (most recent call last):\n  File "x.py", line 1\nValueError: boom'
    assert crashes_logged(record + "\n" + traceback) == traceback.splitlines()
    error = json.dumps({"level": "error", "event": "unhandled"})
    assert crashes_logged(error) == [error]
