"""Structured logs: one JSON object per line, ids on the lines, never message text or tokens."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from chatclient.client import ChatApi, ChatClient
from chatserver.auth import Authenticator
from chatserver.ops import logs
from chatserver.ops.logs import JsonAccessLogger, JsonFormatter
from protocol import Encoding
from tests.serverproc import ServerProc

SECRET = "log-test-secret-0123456789abcdefghijkl"
TEXT = "zebra-quartz-7781 my card number is 4111 1111 1111 1111"


def _record(msg: str, *args: object, **extra: Any) -> logging.LogRecord:
    logger = logging.getLogger("chatserver.test")
    return logger.makeRecord(logger.name, logging.INFO, __file__, 1, msg, args, None, extra=extra)


def test_formatter_writes_one_json_object_with_the_base_fields() -> None:
    line = JsonFormatter("inst-1").format(
        _record("joined %s", "c1", session="s1", conversation="c1", user="u1", when=object())
    )
    assert "\n" not in line
    out = json.loads(line)
    assert out["level"] == "info" and out["event"] == "joined c1"
    assert out["instance"] == "inst-1" and out["logger"] == "chatserver.test"
    assert out["time"].endswith("+00:00") and "T" in out["time"]
    assert (out["session"], out["conversation"], out["user"]) == ("s1", "c1", "u1")
    assert isinstance(out["when"], str)  # anything unserializable becomes its str()


def test_formatter_masks_text_and_credentials_passed_as_fields() -> None:
    line = JsonFormatter("i").format(_record("oops", text=TEXT, token="eyJ.x.y", Authorization="B"))
    out = json.loads(line)
    assert out["text"] == out["token"] == out["Authorization"] == "***"
    assert "zebra" not in line and "eyJ" not in line


def test_formatter_keeps_a_traceback_in_the_object() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.getLogger("t").makeRecord(
            "t", logging.ERROR, __file__, 1, "failed", (), __import__("sys").exc_info()
        )
    out = json.loads(JsonFormatter("i").format(record))
    assert out["level"] == "error" and "ValueError: boom" in out["exc"]


class _Req:
    method = "GET"
    path = "/ws"
    remote = "127.0.0.1"


class _Resp:
    status = 101


@pytest.mark.parametrize(("path", "level"), [("/ws", "info"), ("/readyz", "debug")])
def test_access_log_has_no_query_and_quiets_probes(path: str, level: str) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter("i"))
    logger = logging.getLogger(f"test.access.{level}")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    request = _Req()
    request.path = path  # aiohttp's request.path never has the query
    JsonAccessLogger(logger, "").log(request, _Resp(), 0.0123)  # type: ignore[arg-type]
    out = json.loads(stream.getvalue())
    assert out["level"] == level and out["path"] == path and out["status"] == 101
    assert out["duration_ms"] == 12.3 and out["method"] == "GET"
    logger.setLevel(logging.INFO)
    stream.truncate(0)
    JsonAccessLogger(logger, "").log(request, _Resp(), 0.0123)  # type: ignore[arg-type]
    assert bool(stream.getvalue()) == (level == "info")


def test_announce_prints_json_on_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    logs.announce("chatserver listening on http://127.0.0.1:1/", url="http://127.0.0.1:1/")
    out = json.loads(capsys.readouterr().out)
    assert out["event"] == "chatserver listening on http://127.0.0.1:1/"
    assert out["url"] == "http://127.0.0.1:1/" and out["level"] == "info"


async def test_a_real_server_logs_json_with_ids_and_never_text_or_tokens(tmp_path: Path) -> None:
    """A `chatserver serve` process at info: every line of its output is a JSON object."""
    auth = Authenticator(SECRET)
    alice_token = auth.issue("alice-log", ttl_s=600)
    bob_token = auth.issue("bob-log", ttl_s=600)
    server = ServerProc(
        tmp_path,
        env={
            "CHAT_JWT_SECRET": SECRET,
            "CHAT_LOG_LEVEL": "info",
            "CHAT_SERVER_ID": "log-instance",
            "CHAT_LOCAL_TTFT_MS": "5",
            "CHAT_LOCAL_TOKEN_MS": "2",
        },
    )
    server.start()
    try:
        async with aiohttp.ClientSession() as http:
            api = ChatApi(server.url, alice_token, http)
            conv = str((await api.create_conversation(members=["bob-log"]))["id"])
            # the token in the query string (browsers cannot set headers on a WebSocket)
            alice = await ChatClient.connect(
                server.ws_url, alice_token, encoding=Encoding.JSON, auth="query"
            )
            bob = await ChatClient.connect(server.ws_url, bob_token, encoding=Encoding.MSGPACK)
            assert alice.hello is not None and bob.hello is not None
            alice_session = alice.hello.session_id
            bob_session = bob.hello.session_id
            await alice.join(conv)
            await bob.join(conv)
            ack = await alice.send(conv, TEXT)
            reply = await alice.reply(ack.message_id)
            assert TEXT in reply.text  # the local model echoes it: the reply must not leak it
            status, _ = await api.request("GET", f"/api/conversations/{conv}/messages?limit=5")
            assert status == 200
            await alice.close()
            await bob.close()
    finally:
        assert server.stop() == 0
    output = server.output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) > 5
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            pytest.fail(f"not a JSON line: {line!r}")
        assert isinstance(record, dict), line
        assert {"time", "level", "event", "instance"} <= record.keys(), line
        assert record["instance"] == "log-instance"
        records.append(record)

    def find(event: str, **fields: str) -> dict[str, Any]:
        for record in records:
            if record["event"] == event and fields.items() <= record.items():
                return record
        raise AssertionError(f"no {event!r} line with {fields}:\n{output}")

    find("conversation created", user="alice-log", conversation=conv)
    find("connection opened", session=alice_session, user="alice-log", encoding="json")
    find("connection opened", session=bob_session, user="bob-log", encoding="msgpack")
    find("joined", session=alice_session, user="alice-log", conversation=conv)
    find("joined", session=bob_session, user="bob-log", conversation=conv)
    find("connection closed", session=alice_session, user="alice-log")
    find("connection closed", session=bob_session, user="bob-log")
    # the access log: JSON, one line per request, the path without its query
    access = [r for r in records if r.get("logger") == "aiohttp.access"]
    assert any(r["path"] == "/ws" and r["status"] == 101 for r in access), access
    assert any(r["path"] == f"/api/conversations/{conv}/messages" for r in access), access
    assert all("?" not in r["path"] and "?" not in r["event"] for r in access)
    assert any(r["event"].startswith("chatserver listening on http://") for r in records)
    # nothing a user typed, a model said, or a credential
    for secret in (TEXT, "zebra-quartz-7781", "4111 1111", reply.text, alice_token, bob_token):
        assert secret not in output, f"{secret[:20]!r}... appears in the log"
    assert SECRET not in output
