"""Every bad input gets its documented answer, and other clients keep being served."""

from __future__ import annotations

import asyncio
import time
import tracemalloc

import aiohttp
import jwt
import msgpack
import pytest

from chatclient.client import ChatClient, Closed
from chatserver import keys
from protocol import Ack, CloseCode, Encoding, ErrorCode, ErrorFrame, Pong

from ..conftest import Harness, MakeHarness


async def _error(client: ChatClient, timeout: float = 5.0) -> ErrorFrame:
    return await client.expect(ErrorFrame, timeout=timeout)


async def _still_served(harness: Harness, conv: str) -> None:
    """A well-behaved client in the same conversation is unaffected."""
    bob = await harness.connect("bob")
    await bob.join(conv)
    ack = await bob.send(conv, "still here")
    reply = await bob.reply(ack.message_id)
    assert reply.end is not None and reply.end.finish_reason == "stop"


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        ("{not json", ErrorCode.BAD_FRAME),
        ("[1, 2, 3]", ErrorCode.BAD_FRAME),
        ('"a string"', ErrorCode.BAD_FRAME),
        ('{"conversation_id": "x"}', ErrorCode.BAD_FRAME),
        ('{"type": 5}', ErrorCode.BAD_FRAME),
        ('{"type": "shout", "ref": "r1"}', ErrorCode.UNKNOWN_TYPE),
        ('{"type": "join", "conversation_id": "not-a-uuid", "ref": "r1"}', ErrorCode.BAD_FRAME),
        ('{"type": "cancel", "generation_id": "1; DROP TABLE x"}', ErrorCode.BAD_FRAME),
        ('{"type": "join", "conversation_id": 42, "ref": "r1"}', ErrorCode.BAD_FRAME),
        (
            '{"type": "history", "conversation_id": "5b0c3a5e-0000-4000-8000-000000000000", "limit": "5"}',
            ErrorCode.BAD_FRAME,
        ),
        (
            '{"type": "history", "conversation_id": "5b0c3a5e-0000-4000-8000-000000000000", "limit": 0}',
            ErrorCode.BAD_FRAME,
        ),
        (
            '{"type": "history", "conversation_id": "5b0c3a5e-0000-4000-8000-000000000000", "limit": 101}',
            ErrorCode.BAD_FRAME,
        ),
        (
            '{"type": "send", "conversation_id": "5b0c3a5e-0000-4000-8000-000000000000", "client_msg_id": true, "text": "x"}',
            ErrorCode.BAD_FRAME,
        ),
    ],
)
async def test_malformed_frames_get_an_error_and_the_connection_lives(
    harness: Harness, payload: str, code: ErrorCode
) -> None:
    conv = await harness.conversation("alice", members=["bob"])
    alice = await harness.connect("alice")
    await alice.send_raw(payload)
    error = await _error(alice)
    assert error.code == code.value
    if '"ref": "r1"' in payload:
        assert error.ref == "r1"
    assert (await alice.ping(7)).ts == 7  # still open and answering
    await _still_served(harness, conv)


async def test_text_over_the_limit_is_too_large(make_harness: MakeHarness) -> None:
    harness = await make_harness(max_text_chars=100)
    conv = await harness.conversation("alice", members=["bob"])
    alice = await harness.connect("alice")
    await alice.send_raw(
        '{"type":"send","conversation_id":"%s","client_msg_id":"m1","text":"%s","ref":"big"}'
        % (conv, "x" * 101)
    )
    error = await _error(alice)
    assert (error.code, error.ref) == (ErrorCode.TOO_LARGE.value, "big")
    history = await alice.history(conv)
    assert history.messages == ()  # nothing was stored
    await _still_served(harness, conv)


async def test_binary_frame_on_json_subprotocol(harness: Harness) -> None:
    alice = await harness.connect("alice", Encoding.JSON)
    await alice.send_raw(msgpack.packb({"type": "ping", "ts": 1}))
    assert (await _error(alice)).code == ErrorCode.BAD_FRAME.value
    assert (await alice.ping(2)).ts == 2


async def test_text_frame_on_msgpack_subprotocol(harness: Harness) -> None:
    alice = await harness.connect("alice", Encoding.MSGPACK)
    await alice.send_raw('{"type":"ping"}')
    assert (await _error(alice)).code == ErrorCode.BAD_FRAME.value
    assert (await alice.ping(3)).ts == 3


async def test_frame_over_max_frame_bytes_closes_1009(make_harness: MakeHarness) -> None:
    harness = await make_harness(max_frame_bytes=4096)
    conv = await harness.conversation("alice", members=["bob"])
    alice = await harness.connect("alice")
    await alice.send_raw('{"type":"ping","pad":"%s"}' % ("x" * 5000))
    with pytest.raises(Closed):
        await alice.expect(Pong, timeout=5)
    assert alice.close_code == CloseCode.MESSAGE_TOO_BIG
    await _still_served(harness, conv)


async def test_a_frame_of_exactly_max_frame_bytes_is_served(make_harness: MakeHarness) -> None:
    harness = await make_harness(max_frame_bytes=4096)
    conv = await harness.conversation("alice")
    alice = await harness.connect("alice")
    head = '{"type":"send","conversation_id":"%s","client_msg_id":"c1","text":"' % conv
    frame = head + "x" * (4096 - len(head) - 2) + '"}'
    assert len(frame.encode()) == 4096
    await alice.send_raw(frame)
    ack = await alice.expect(Ack, timeout=5)
    assert ack.client_msg_id == "c1"
    await alice.send_raw(frame[:-2] + 'x"}')  # one byte over
    with pytest.raises(Closed):
        await alice.expect(Pong, timeout=5)
    assert alice.close_code == CloseCode.MESSAGE_TOO_BIG


async def test_nested_msgpack_headers_before_auth_are_a_cheap_refusal(
    make_harness: MakeHarness,
) -> None:
    """Array headers that claim 65,535 items each, nested 1,000 deep in one 64 KiB frame,
    would make an unbounded decoder reserve ~500 MB before reading an item."""
    harness = await make_harness()
    conv = await harness.conversation("alice", members=["bob"])
    attack = (b"\xdd\x00\x00\xff\xff" * 1000).ljust(64 * 1024 - 1, b"\x00")
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(harness.ws_url, protocols=(Encoding.MSGPACK.value,))
        tracemalloc.start()
        try:
            await ws.send_bytes(attack)
            answer = await ws.receive(timeout=5)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        error = msgpack.unpackb(answer.data)
        assert error["type"] == "error" and error["code"] == ErrorCode.UNAUTHORIZED.value
        assert "MessagePack" in error["message"]
        assert peak < 16 * 1024 * 1024  # the server decodes in this process
        await ws.close()
    await _still_served(harness, conv)


async def test_flood_of_bad_frames_closes_1008(make_harness: MakeHarness) -> None:
    harness = await make_harness(bad_frame_limit=5)
    conv = await harness.conversation("alice", members=["bob"])
    alice = await harness.connect("alice")
    for _ in range(6):
        await alice.send_raw("nonsense")
    errors = 0
    with pytest.raises(Closed):
        while True:
            await alice.expect(ErrorFrame, timeout=5)
            errors += 1
    assert errors == 6
    assert alice.close_code == CloseCode.POLICY_VIOLATION
    await _still_served(harness, conv)


async def test_no_auth_in_time_closes_4401(make_harness: MakeHarness) -> None:
    harness = await make_harness(auth_timeout_s=0.3)
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(harness.ws_url, protocols=("chat.v1.json",))
        started = time.monotonic()
        first = await ws.receive(timeout=5)
        assert first.type == aiohttp.WSMsgType.TEXT
        assert '"unauthorized"' in first.data
        closing = await ws.receive(timeout=5)
        assert closing.type == aiohttp.WSMsgType.CLOSE
        assert ws.close_code == CloseCode.UNAUTHORIZED
        assert 0.25 <= time.monotonic() - started < 3


async def test_pings_do_not_extend_the_auth_deadline(make_harness: MakeHarness) -> None:
    harness = await make_harness(auth_timeout_s=0.5)
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(harness.ws_url, protocols=("chat.v1.json",), autoping=False)
        started = time.monotonic()

        async def keep_pinging() -> None:
            for _ in range(200):  # 10 s at most; each ping used to restart the wait
                await ws.ping()
                await asyncio.sleep(0.05)

        pinger = asyncio.create_task(keep_pinging())
        try:
            kinds = []
            while not kinds or kinds[-1] != aiohttp.WSMsgType.CLOSE:
                msg = await ws.receive(timeout=5)
                if msg.type is not aiohttp.WSMsgType.PONG:
                    kinds.append(msg.type)
                    if msg.type is aiohttp.WSMsgType.TEXT:
                        assert '"unauthorized"' in msg.data
        finally:
            pinger.cancel()
        assert kinds == [aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.CLOSE]
        assert ws.close_code == CloseCode.UNAUTHORIZED
        assert time.monotonic() - started < 3


def test_the_default_auth_timeout_is_five_seconds() -> None:
    from chatserver.settings import Settings

    assert Settings().ws.auth_timeout_s == 5.0


def _forged(
    alg: str, claims: dict[str, object], key: str = "a-wrong-secret-long-enough-for-hs256!"
) -> str:
    if alg == "none":
        return jwt.encode(claims, None, algorithm="none")  # type: ignore[arg-type]
    return jwt.encode(claims, key, algorithm=alg)


@pytest.mark.parametrize("how", ["header", "frame", "query"])
@pytest.mark.parametrize("kind", ["garbage", "bad_signature", "expired", "alg_none", "no_exp"])
async def test_bad_tokens_close_4401(harness: Harness, how: str, kind: str) -> None:
    now = int(time.time())
    secret = harness.app[keys.AUTH]._secret
    tokens = {
        "garbage": "not.a.jwt",
        "bad_signature": _forged("HS256", {"sub": "eve", "exp": now + 60}),
        "expired": jwt.encode({"sub": "eve", "exp": now - 120}, secret, algorithm="HS256"),
        "alg_none": _forged("none", {"sub": "eve", "exp": now + 60}),
        "no_exp": jwt.encode({"sub": "eve"}, secret, algorithm="HS256"),
    }
    await _refused(harness, tokens[kind], how)


async def _refused(harness: Harness, token: str, how: str = "header") -> None:
    """The documented answer to a bad token: an `unauthorized` error, then close 4401."""
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(
            harness.ws_url,
            headers={"Authorization": f"Bearer {token}"} if how == "header" else {},
            params={"token": token} if how == "query" else None,
        )
        if how == "frame":
            await ws.send_str('{"type":"auth","token":"%s"}' % token)
        first = await ws.receive(timeout=5)
        assert first.type == aiohttp.WSMsgType.TEXT
        assert '"code":"unauthorized"' in first.data
        assert (await ws.receive(timeout=5)).type == aiohttp.WSMsgType.CLOSE
        assert ws.close_code == CloseCode.UNAUTHORIZED


# The attacker's token is signed with the server's own (HS256-sized) secret on purpose.
@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")
async def test_hs512_token_with_the_right_secret_is_refused(harness: Harness) -> None:
    secret = harness.app[keys.AUTH]._secret
    token = jwt.encode({"sub": "eve", "exp": int(time.time()) + 60}, secret, algorithm="HS512")
    await _refused(harness, token)


async def test_first_frame_must_be_auth(harness: Harness) -> None:
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(harness.ws_url)
        await ws.send_str('{"type":"ping"}')
        first = await ws.receive(timeout=5)
        assert '"unauthorized"' in first.data
        assert (await ws.receive(timeout=5)).type == aiohttp.WSMsgType.CLOSE
        assert ws.close_code == CloseCode.UNAUTHORIZED


async def test_non_members_are_forbidden(harness: Harness) -> None:
    conv = await harness.conversation("alice")
    mallory = await harness.connect("mallory")
    for frame in (
        '{"type":"join","conversation_id":"%s","ref":"j"}',
        '{"type":"send","conversation_id":"%s","client_msg_id":"m","text":"hi","ref":"s"}',
        '{"type":"history","conversation_id":"%s","ref":"h"}',
        '{"type":"typing","conversation_id":"%s","ref":"t"}',
    ):
        await mallory.send_raw(frame % conv)
        error = await _error(mallory)
        assert error.code == ErrorCode.FORBIDDEN.value
    await mallory.send_raw(
        '{"type":"join","conversation_id":"9e0f1c2d-3b4a-4c5d-8e6f-708192a3b4c5","ref":"n"}'
    )
    assert (await _error(mallory)).code == ErrorCode.NOT_FOUND.value
    alice = await harness.connect("alice")
    assert (await alice.history(conv)).messages == ()


async def test_unsupported_subprotocol_is_refused_with_400(harness: Harness) -> None:
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await http.ws_connect(harness.ws_url, protocols=("chat.v2.xml", "graphql-ws"))
        assert info.value.status == 400
        async with http.get(
            harness.ws_url.replace("ws", "http", 1),
            headers={
                "Upgrade": "websocket",
                "Connection": "Upgrade",
                "Sec-WebSocket-Version": "13",
                "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                "Sec-WebSocket-Protocol": "chat.v2.xml",
            },
        ) as resp:
            assert resp.status == 400
            assert "chat.v1.json" in await resp.text()


async def test_negotiated_subprotocol_is_echoed(harness: Harness) -> None:
    token = await harness.token("alice")
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(
            harness.ws_url,
            protocols=("chat.v1.msgpack", "chat.v1.json"),
            headers={"Authorization": f"Bearer {token}"},
        )
        assert ws.protocol == "chat.v1.msgpack"
        hello = await ws.receive(timeout=5)
        assert hello.type == aiohttp.WSMsgType.BINARY
        assert msgpack.unpackb(hello.data)["type"] == "hello"
        await ws.close()


async def test_a_second_auth_frame_is_a_bad_frame(harness: Harness) -> None:
    alice = await harness.connect("alice", auth="frame")
    await alice.send_raw('{"type":"auth","token":"x","ref":"again"}')
    error = await _error(alice)
    assert (error.code, error.ref) == (ErrorCode.BAD_FRAME.value, "again")
    await asyncio.wait_for(alice.ping(1), 5)
