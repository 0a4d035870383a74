"""Hypothesis against a live server: random and mutated frames, both encodings.

Bounded by the example count. Whatever arrives, the server answers with errors or a
documented close (never 1011), logs no unhandled exception, and keeps serving others.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import aiohttp
import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatclient.client import ChatApi, ChatClient
from protocol import CLIENT_TYPES, CloseCode
from tests.serverproc import ServerProc

from .scaleout import SECRET, token

ALLOWED_CLOSES = {
    CloseCode.NORMAL,
    CloseCode.POLICY_VIOLATION,
    CloseCode.MESSAGE_TOO_BIG,
    CloseCode.UNAUTHORIZED,
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    proc = ServerProc(
        tmp_path_factory.mktemp("fuzz"),
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


@settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_random_and_mutated_frames(
    server: ServerProc, conversation: str, data: st.DataObject
) -> None:
    sent = data.draw(st.lists(frames(conversation), min_size=1, max_size=8))
    code = asyncio.run(_barrage(server, sent))
    assert code is None or code in ALLOWED_CLOSES, f"closed with {code}"
    assert code != CloseCode.INTERNAL_ERROR


def test_after_the_fuzz_the_server_serves_and_logged_no_crash(
    server: ServerProc, conversation: str
) -> None:
    async def bystander() -> None:
        client = await ChatClient.connect(server.ws_url, token("bystander"))
        try:
            await client.join(conversation)
            ack = await client.send(conversation, "still here")
            reply = await client.reply(ack.message_id)
            assert reply.end is not None and reply.end.finish_reason == "stop"
        finally:
            await client.close()

    asyncio.run(bystander())
    errors = []
    for line in server.output.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("level") in ("error", "critical"):
            errors.append(record)
    assert errors == [], errors[:3]
