"""The load-test harness: against a real server its counts add up, and it can fail.

In-process servers (the app on a real socket) serve the harness's worker processes; the CLI
and the SLO exit codes run against a ``chatserver serve`` subprocess. The accounting, the
histograms, the frame parser and the dialects are also checked on their own, with inputs
made to be wrong: a duplicate, a gap, a reordering must each be seen.
"""

from __future__ import annotations

import asyncio
import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from chatload import LoadConfig, procstat, run_loadtest
from chatload.accounting import (
    DUPLICATE,
    FRESH,
    REORDERED,
    Receiver,
    Tally,
    marker,
    parse_marker,
    unmark,
)
from chatload.config import ConfigError
from chatload.dialects import dialect
from chatload.report import check_slos
from chatload.stats import Histogram, bucket_of, value_of
from chatload.worker import Worker
from chatload.wsclient import OP_BINARY, OP_PONG, OP_TEXT, WsProtocol
from tests.chatserver.conftest import MakeHarness
from tests.serverproc import REPO_ROOT, ServerProc

pytestmark = pytest.mark.timeout(90)


def _config(url: str, **fields: Any) -> LoadConfig:
    base: dict[str, Any] = {
        "urls": [url],
        "quiet": True,
        "ramp_s": 0.3,
        "duration_s": 1.0,
        "procs": 2,
        "drain_timeout_s": 15,
    }
    return LoadConfig(**{**base, **fields})


# -- against a real server ---------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["json", "msgpack"])
async def test_chat_counts_add_up(make_harness: MakeHarness, encoding: str) -> None:
    harness = await make_harness()
    report = await run_loadtest(
        _config(
            harness.base_url,
            mode="chat",
            clients=6,
            members=3,
            rate=40,
            encoding=encoding,
            max_loss=0,
            max_errors=0,
        )
    )
    counts = report["counts"]
    assert report["connections"]["connected"] == 6
    assert counts["sent"] > 10
    assert counts["acked"] == counts["sent"]
    # every acked message reaches all 3 members of its conversation, once
    assert counts["expected_deliveries"] == 3 * counts["acked"]
    assert counts["delivered"] == counts["expected_deliveries"]
    assert (counts["lost"], counts["duplicated"], counts["reordered"]) == (0, 0, 0)
    assert report["latency_ms"]["delivery"]["count"] == counts["delivered"]
    assert report["latency_ms"]["ack"]["count"] == counts["acked"]
    assert report["latency_ms"]["join"]["count"] == 6
    assert report["harness"]["cpu_s"] > 0
    assert report["slo"]["ok"], report["slo"]


async def test_flat_out_keeps_a_window_and_loses_nothing(make_harness: MakeHarness) -> None:
    harness = await make_harness()
    report = await run_loadtest(
        _config(harness.base_url, mode="chat", clients=8, members=4, senders=2, rate=0, window=3)
    )
    counts = report["counts"]
    assert counts["sent"] > 20  # flat out: each release sends the next one
    # 2 workers: the windows span them (flow.py); how often one waited is reported
    assert 0 <= counts["sent_after_other_workers"] <= counts["sent"]
    assert counts["delivered"] == counts["expected_deliveries"] == 4 * counts["acked"]
    assert counts["defects"] == 0
    assert report["rates_per_s"]["delivered"] > 0


async def test_ai_mode_measures_first_token_and_gaps(make_harness: MakeHarness) -> None:
    harness = await make_harness()
    report = await run_loadtest(
        _config(
            harness.base_url,
            mode="ai",
            clients=4,
            members=1,
            rate=0,
            window=1,
            provider_ttft_ms=5,
            provider_token_ms=2,
            max_loss=0,
        )
    )
    counts = report["counts"]
    replies = counts["replies"]
    assert counts["acked"] >= 4
    assert replies["ended"] == replies["expected"] == counts["acked"]
    assert replies["finish_reasons"] == {"stop": replies["ended"]}
    latency = report["latency_ms"]
    assert latency["ttft"]["count"] == counts["acked"]
    assert latency["gap"]["count"] > 0
    assert latency["ttft_added"]["p50"] == pytest.approx(latency["ttft"]["p50"] - 5, abs=0.01)
    assert counts["deltas"]["delivered"] > latency["ttft"]["count"]
    assert counts["defects"] == 0 and report["slo"]["ok"]


async def test_turns_open_new_conversations(make_harness: MakeHarness) -> None:
    harness = await make_harness()
    report = await run_loadtest(
        _config(
            harness.base_url,
            mode="ai",
            clients=3,
            members=1,
            rate=12,
            turns=2,
            max_loss=0,
            max_errors=0,
        )
    )
    counts = report["counts"]
    assert counts["conversations_created"] >= counts["acked"] // 2 >= 2
    assert report["latency_ms"]["rest"]["count"] == counts["conversations_created"]
    assert counts["replies"]["ended"] == counts["acked"]
    assert report["slo"]["ok"], report["slo"]


async def test_a_refusing_server_is_reported_not_hidden(make_harness: MakeHarness) -> None:
    # 2 messages a minute: most sends are refused with rate_limited
    harness = await make_harness(limits_free="messages_per_minute=2,connections=5,daily_tokens=100")
    report = await run_loadtest(
        _config(harness.base_url, mode="chat", clients=2, members=2, rate=20, max_errors=0)
    )
    counts = report["counts"]
    assert counts["rejected"].get("rate_limited", 0) > 0
    assert counts["acked"] + sum(counts["rejected"].values()) == counts["sent"]
    assert counts["delivered"] == counts["expected_deliveries"]  # refused ones are not owed
    assert not report["slo"]["ok"]


async def test_a_wrong_url_fails_every_connection(make_harness: MakeHarness) -> None:
    harness = await make_harness()
    report = await run_loadtest(
        # the socketio dialect asks for /socket.io/: chatserver answers 404
        _config(
            harness.base_url,
            mode="idle",
            clients=2,
            members=1,
            dialect="socketio",
            connect_timeout_s=1.0,
            max_errors=0,
        )
    )
    assert report["connections"]["connected"] == 0
    assert report["connections"]["failed"] == 2
    assert report["errors"]
    assert not report["slo"]["ok"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    env = {
        "CHAT_JWT_SECRET": "loadtest-test-secret-0123456789abcdef",
        "CHAT_LIMITS_FREE": "messages_per_minute=1000000,connections=1000,daily_tokens=1000000000",
        "CHAT_LOCAL_TTFT_MS": "5",
        "CHAT_LOCAL_TOKEN_MS": "2",
        "CHAT_LOG_LEVEL": "warning",
    }
    with ServerProc(tmp_path_factory.mktemp("loadtest"), env=env) as proc:
        yield proc


def _cli(server: ServerProc, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    assert server.proc is not None
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "chatserver",
            "loadtest",
            "--url",
            server.url,
            "--clients",
            "4",
            "--members",
            "2",
            "--rate",
            "20",
            "--duration",
            "1",
            "--ramp",
            "0.2",
            "--procs",
            "2",
            "--server-pid",
            str(server.proc.pid),
            "--out",
            str(out),
            *extra,
        ],
        cwd=REPO_ROOT,
        env={"CHAT_JWT_SECRET": server.env["CHAT_JWT_SECRET"], "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_cli_writes_the_report_and_passes_a_met_slo(server: ServerProc, tmp_path: Path) -> None:
    done = _cli(server, tmp_path / "r.json", "--slo-p99-ms", "5000", "--max-loss", "0")
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["slo"]["ok"] and len(report["slo"]["checks"]) >= 3
    assert report["config"]["jwt_secret"] == "***"  # minted from CHAT_JWT_SECRET, not shown
    assert report["server"]["cpu_s"] is not None
    assert report["server"]["cpu_us_per_delivery"] > 0
    assert "SLO ok" in done.stderr  # the summary line
    assert "conns" in done.stderr  # the progress line


def test_cli_exits_non_zero_when_the_p99_slo_is_missed(server: ServerProc, tmp_path: Path) -> None:
    done = _cli(server, tmp_path / "r.json", "--slo-p99-ms", "0.001")
    assert done.returncode == 1
    assert "SLO missed: ack p99 ms" in done.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert not report["slo"]["ok"]


def test_cli_measures_idle_memory(server: ServerProc, tmp_path: Path) -> None:
    done = _cli(server, tmp_path / "r.json", "--mode", "idle", "--clients", "50", "--hold", "0.3")
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["connections"]["connected"] == 50
    assert report["server"]["kib_per_connection"] is not None


def test_cli_refuses_bad_settings(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            *("-m", "chatserver", "loadtest", "--dialect", "socketio", "--encoding", "msgpack"),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    assert "--encoding msgpack: only the chatserver dialect speaks it" in done.stderr
    # Every dialect may ask for replies: the peers answer when started with an agent
    # (bench/peers/bare.py and sio.py --agent-token-ms); one without stays unanswered.
    for name in ("chatserver", "peer", "socketio"):
        assert LoadConfig(mode="ai", dialect=name).validate().mode == "ai"
    with pytest.raises(ConfigError, match="--turns"):
        LoadConfig(members=2, turns=3).validate()


def test_procstat_counts_write_syscalls_and_the_loop_thread(tmp_path: Path) -> None:
    pid = os.getpid()
    before = procstat.sample([pid])[str(pid)]
    fd = os.open(tmp_path / "sink", os.O_WRONLY | os.O_CREAT)
    try:
        for _ in range(50):
            os.write(fd, b"x")
    finally:
        os.close(fd)
    after = procstat.sample([pid])[str(pid)]
    assert isinstance(before["syscw"], int) and isinstance(after["syscw"], int)
    assert after["syscw"] - before["syscw"] >= 50
    loop_cpu, cpu = after["loop_cpu_s"], after["cpu_s"]
    assert loop_cpu is not None and cpu is not None and 0 <= loop_cpu <= cpu
    assert procstat.cpu_seconds(pid, thread=999_999_999) is None  # no such thread


# -- the accounting can fail -------------------------------------------------------------


def test_tally_sees_duplicates_gaps_and_reordering() -> None:
    tally, receiver = Tally(), Receiver()
    assert tally.see(receiver, 0, 7, 1) == FRESH
    assert tally.see(receiver, 0, 7, 2) == FRESH
    assert tally.see(receiver, 0, 7, 2) == DUPLICATE
    assert tally.see(receiver, 0, 7, 5) == FRESH  # 3 and 4 skipped
    assert tally.gaps == 2
    assert tally.see(receiver, 0, 7, 3) == REORDERED
    assert tally.see(receiver, 0, 7, 3) == DUPLICATE  # seen once already
    assert tally.see(receiver, 0, 8, 1) == FRESH  # another sender: its own sequence
    assert (tally.duplicated, tally.reordered, tally.delivered_total) == (2, 1, 5)
    # 5 acked messages from sender 7 in conversation 0 with one member here: 4 arrived
    assert tally.lost({0: 6}, {0: 1}) == (6, 1)
    assert tally.lost({0: 5}, {0: 1}) == (5, 0)
    assert tally.lost({0: 5}, {0: 2}) == (10, 5)


def _worker(**fields: Any) -> Worker:
    config = LoadConfig(**{"clients": 2, "members": 2, "procs": 1, "mode": "chat", **fields})
    return Worker(config.validate(), 0, emit=lambda event: None)


def test_worker_counts_a_duplicated_delivery() -> None:
    worker = _worker()
    receiver = worker.clients[1]
    worker.local_members[0] = 1  # the receiver joined conversation 0
    frame = b'{"type":"message","message":{"text":"~L' + marker(0, 1, 1).encode() + b' hi"}}'
    worker.on_payload(receiver, frame, OP_TEXT, 5_000_000)
    worker.on_payload(receiver, frame, OP_TEXT, 6_000_000)  # the same message again
    assert worker.tally.delivered_total == 1
    assert worker.tally.duplicated == 1
    assert worker.hist["delivery"].count == 1
    worker.expected = {0: 2}  # two were acked: one never arrived
    report = worker.report()
    assert report["counts"]["lost"] == 1 and report["counts"]["duplicated"] == 1


def test_worker_counts_reordered_and_lost_deltas() -> None:
    worker = _worker(mode="ai", clients=1, members=1)
    client = worker.clients[0]

    def frame(obj: dict[str, Any]) -> bytes:
        return json.dumps(obj).encode()

    client.asked["m1"] = 1_000_000
    worker.on_payload(
        client,
        frame({"type": "gen_start", "generation_id": "g", "reply_to": "m1"}),
        OP_TEXT,
        2_000_000,
    )
    for seq, at in ((1, 3_000_000), (2, 4_000_000), (4, 6_000_000), (4, 7_000_000)):
        worker.on_payload(
            client,
            frame({"type": "delta", "generation_id": "g", "seq": seq, "text": "x"}),
            OP_TEXT,
            at,
        )
    assert worker.counts["deltas_lost"] == 1  # seq 3 never came
    assert worker.counts["deltas_duplicated"] == 1
    assert worker.hist["ttft"].percentile_us(0.5) == 2000  # 3 ms - 1 ms
    assert worker.hist["gap"].count == 1  # 1->2 only: no gap is measured across a hole


def test_a_defect_fails_the_loss_slo() -> None:
    config = LoadConfig(max_loss=0, slo_p99_ms=10)
    latency = {
        name: {"count": 1, "p50": 1.0, "p95": 2.0, "p99": 3.0}
        for name in ("ack", "join", "rest", "delivery", "ttft")
    }
    report: dict[str, Any] = {"latency_ms": latency, "counts": {"defects": 0, "failures": 0}}
    assert check_slos(config, report)["ok"]
    report["counts"]["defects"] = 1
    verdict = check_slos(config, report)
    assert not verdict["ok"]
    assert [c["name"] for c in verdict["checks"] if not c["ok"]] == ["lost+duplicated+reordered"]


def test_markers_round_trip() -> None:
    tag = marker(123456, 42, 987654321012345678)
    assert len(tag) == 32
    assert unmark(tag) == (123456, 42, 987654321012345678)
    assert parse_marker(b'..."text":"~L' + tag.encode() + b' lorem"') == unmark(tag)
    assert unmark("not a marker") is None and parse_marker(b"no marker") is None


# -- histograms, frames, dialects ----------------------------------------------------------


def test_histogram_percentiles_and_merge() -> None:
    hist = Histogram()
    for us in range(1, 1001):  # 1 .. 1000 µs
        hist.record_us(us)
    summary = hist.summary()
    assert summary["count"] == 1000
    assert (summary["p50"], summary["p99"], summary["max"]) == (0.5, 0.99, 1.0)
    assert hist.summary(offset_ms=0.5)["p50"] == 0.0
    other = Histogram()
    other.record_us(3_000_000)  # 3 s: a log bucket
    hist.merge_wire(other.to_wire())
    assert hist.count == 1001
    assert 2990 <= hist.summary()["max"] <= 3000
    for value in (0, 5, 2047, 2048, 4097, 10**6, 10**9):
        assert value_of(bucket_of(value)) <= value < value_of(bucket_of(value)) * 1.001 + 1


class _Transport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_write_buffer_size(self) -> int:
        return 0


async def test_frame_parser_handles_splits_lengths_pings_and_close() -> None:
    seen: list[tuple[bytes, int]] = []
    closes: list[int | None] = []
    proto = WsProtocol(
        b"GET / HTTP/1.1\r\n\r\n", lambda p, op, now: seen.append((p, op)), closes.append
    )
    transport = _Transport()
    proto.connection_made(transport)  # type: ignore[arg-type]
    big = b"x" * 300
    huge = b"y" * 70_000
    stream = (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n"
        + b"\x81\x05hello"
        + b"\x82\x7e"
        + struct.pack("!H", len(big))
        + big
        + b"\x89\x02hi"  # ping
        + b"\x81\x7f"
        + struct.pack("!Q", len(huge))
        + huge
        + b"\x01\x03abc"
        + b"\x80\x03def"  # a fragmented text message
        + b"\x88\x02"
        + struct.pack("!H", 4408)
    )
    for i in range(0, len(stream), 7):  # in 7-byte pieces: every boundary split somewhere
        proto.data_received(stream[i : i + 7])
    assert proto.opened.done()
    assert seen == [(b"hello", OP_TEXT), (big, OP_BINARY), (huge, OP_TEXT), (b"abcdef", OP_TEXT)]
    pong = transport.written[1]
    assert pong[0] == 0x80 | OP_PONG and pong[1] == 0x80 | 2 and pong[-2:] == b"hi"
    assert proto.close_code == 4408 and transport.closed
    proto.connection_lost(None)
    assert closes == [4408]


async def test_a_refused_upgrade_fails_the_handshake() -> None:
    proto = WsProtocol(b"", lambda p, op, now: None, lambda code: None)
    proto.connection_made(_Transport())  # type: ignore[arg-type]
    proto.data_received(b"HTTP/1.1 400 Bad Request\r\n\r\nno")
    with pytest.raises(ConnectionError, match="400"):
        await asyncio.wait_for(proto.opened, 1)


def test_socketio_dialect_unwraps_and_answers_transport_packets() -> None:
    sio = dialect("socketio")
    assert sio.decode(b'0{"sid":"x","pingInterval":25000}') == "40"
    assert sio.decode(b"2") == "3"
    assert sio.decode(b'40{"sid":"y"}') is None
    assert sio.decode(b'42["frame",{"type":"ack","ref":"r"}]') == {"type": "ack", "ref": "r"}
    opcode, data = sio.encode({"type": "join"})
    assert (opcode, data) == (OP_TEXT, b'42["frame",{"type":"join"}]')
    assert data.startswith(b'42["frame",') and sio.message_prefixes[0].startswith(b'42["frame"')
    packed = dialect("chatserver", msgpack_encoding=True)
    opcode, data = packed.encode({"type": "message", "message": {"text": "t"}})
    assert opcode == OP_BINARY and data.startswith(packed.message_prefixes)
    with pytest.raises(ValueError, match="JSON only"):
        dialect("peer", msgpack_encoding=True)
