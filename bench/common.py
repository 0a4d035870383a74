"""What the load scenarios share: servers, peers, a throwaway Redis, the harness, results.

Every scenario starts what it measures in the same run (chatserver instances, the peers,
Redis, Postgres) on 127.0.0.1, drives each with the same harness (chatload),
and writes ``bench/results/<scenario>.json`` with a ``markdown`` block for docs/benchmarks.md.
This machine has 2 cores shared with other work: only ratios within one run mean much.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from chatload import LoadConfig, run_loadtest  # noqa: E402
from chatload.report import summary_line  # noqa: E402
from tests.serverproc import ServerProc, free_port  # noqa: E402
from tests.services import PostgresServer, RedisServer  # noqa: E402

RESULTS = ROOT / "bench" / "results"
SECRET = "bench-secret-0123456789abcdef0123456789"
UNLIMITED = "messages_per_minute=100000000,connections=1000000,daily_tokens=100000000000"
# Every chatserver under load: no per-user limits in the way, logs at warning (the peers log
# nothing either), and the JWT secret the harness mints tokens with.
SERVER_ENV = {
    "CHAT_JWT_SECRET": SECRET,
    "CHAT_LIMITS_FREE": UNLIMITED,
    "CHAT_MAX_QUEUED_REPLIES": "100000000",
    "CHAT_MAX_REPLIES_PER_INSTANCE": "100000000",  # parked replies hold their questions
    "CHAT_LOG_LEVEL": "warning",
    "CHAT_SHUTDOWN_GRACE_S": "1",  # between loads: stop fast (parked replies end as errors)
    "CHAT_DRAIN_JITTER_MS": "100",
}
# Conversations always have an agent; a pure fan-out scenario parks it: its first reply
# waits an hour for a first token, the next ones queue behind it, so no reply frame is sent
# and only the message fan-out runs, as on the peers.
PARKED_AGENT = {"CHAT_LOCAL_TTFT_MS": "3600000"}


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def redis_server() -> Iterator[RedisServer]:
    redis = RedisServer()
    redis.start()
    try:
        yield redis
    finally:
        redis.close()


def redis_pid(redis: RedisServer) -> int:
    proc = redis._proc  # the throwaway server is ours: its pid is what we sample
    assert proc is not None
    return proc.pid


@contextlib.contextmanager
def postgres_server(*, fsync: bool = True) -> Iterator[PostgresServer]:
    """A throwaway Postgres cluster (tests/services/postgres.py), its ``chat`` database
    migrated with ``chatserver migrate`` as an operator would; fsync on by default (the
    product's shape)."""
    settings = {"fsync": "on", "synchronous_commit": "on"} if fsync else {}
    postgres = PostgresServer(settings=settings)
    try:
        postgres.start()
        dsn = postgres.create_database("chat")
        done = subprocess.run(
            [sys.executable, "-m", "chatserver", "migrate", "--database-url", dsn],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            env={k: v for k, v in os.environ.items() if not k.startswith("CHAT_")},
        )
        if done.returncode != 0:
            raise RuntimeError(f"chatserver migrate failed: {done.stdout}{done.stderr}")
        log(f"postgres on port {postgres.port}: {done.stdout.strip().splitlines()[0]}")
        yield postgres
    finally:
        postgres.close()


def postgres_pids(postgres: PostgresServer) -> list[int]:
    """The postmaster and every process it forked (backends, writers) right now."""
    try:
        first = (postgres.data_dir / "postmaster.pid").read_text().split("\n", 1)[0]
        master = int(first)
    except (OSError, ValueError):
        return []
    pids = [master]
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_bytes()
        except OSError:
            continue
        if int(raw[raw.rindex(b")") + 2 :].split()[1]) == master:  # field 4: the parent
            pids.append(int(entry.name))
    return pids


def cpu_of(pids: list[int]) -> dict[int, float]:
    """CPU seconds of each process still there (for deltas over processes that come and go)."""
    from chatload.procstat import cpu_seconds

    found = {pid: cpu_seconds(pid) for pid in pids}
    return {pid: cpu for pid, cpu in found.items() if cpu is not None}


def cpu_grown(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds the processes used between two ``cpu_of`` (new ones count from zero)."""
    return round(sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items()), 3)


@contextlib.contextmanager
def chatservers(
    count: int,
    *,
    redis_url: str | None = None,
    env: dict[str, str] | None = None,
    args: Sequence[str] = (),
    sqlite_path: Path | None = None,
) -> Iterator[list[ServerProc]]:
    """``count`` chatserver processes (on Redis when given), one shared SQLite file."""
    workdir = Path(tempfile.mkdtemp(prefix="chatserver-bench-"))
    store = sqlite_path or workdir / "bench.sqlite3"
    servers: list[ServerProc] = []
    extra = ["--redis-url", redis_url] if redis_url else []
    try:
        for index in range(count):
            server = ServerProc(
                workdir / f"instance-{index}",
                env={**SERVER_ENV, "CHAT_SERVER_ID": f"bench-{index}", **(env or {})},
                args=[*extra, *args],
                sqlite_path=store,
                start_timeout_s=60,
            )
            servers.append(server.start())
        yield servers
    finally:
        for server in servers:
            server.kill()  # no graceful drain: parked replies would each be ended and stored
            server.close()
        shutil.rmtree(workdir, ignore_errors=True)


def pid_of(server: ServerProc) -> int:
    assert server.proc is not None
    return server.proc.pid


class PeerProc:
    """A peer server from bench/peers as a subprocess, ready when /healthz answers."""

    def __init__(self, kind: str, redis_url: str | None = None, args: Sequence[str] = ()) -> None:
        self.kind = kind
        self.port = free_port()
        script = ROOT / "bench" / "peers" / ("bare.py" if kind == "bare" else "sio.py")
        argv = [sys.executable, str(script), "--port", str(self.port)]
        if redis_url:
            argv += ["--redis-url", redis_url]
        argv += args
        handle, name = tempfile.mkstemp(prefix=f"peer-{kind}-", suffix=".log")
        self.log_path = Path(name)
        with os.fdopen(handle, "wb") as log_file:
            self.proc = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, cwd=ROOT)
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"peer {kind} exited: {self.log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"peer {kind} not ready on port {self.port}")
            time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        with contextlib.suppress(OSError):
            self.log_path.unlink()


@contextlib.contextmanager
def peers(
    kind: str, count: int, redis_url: str | None = None, args: Sequence[str] = ()
) -> Iterator[list[PeerProc]]:
    started: list[PeerProc] = []
    try:
        for _ in range(count):
            started.append(PeerProc(kind, redis_url, args))
        yield started
    finally:
        for peer in started:
            peer.close()


def load(**fields: Any) -> dict[str, Any]:
    """Run the harness (its workers are subprocesses) and return its report.

    With ``BENCH_PYSPY=<dir>`` in the environment, py-spy records every server process for the
    whole load (raw collapsed stacks, ``<dir>/<label>-<pid>.txt``): where the server spends.
    ``BENCH_PYSPY_ARGS="--gil"`` samples only the thread holding the GIL (closer to CPU).
    """
    config = LoadConfig(**{"jwt_secret": SECRET, "quiet": True, **fields})
    with _profiled(config.label, config.server_pids):
        report = asyncio.run(run_loadtest(config))
    log(f"  {config.label}: {summary_line(report)}")
    return report


@contextlib.contextmanager
def _profiled(label: str, pids: list[int]) -> Iterator[None]:
    directory = os.environ.get("BENCH_PYSPY")
    if not directory:
        yield
        return
    Path(directory).mkdir(parents=True, exist_ok=True)
    name = "".join(c if c.isalnum() else "-" for c in label)
    spy_bin = str(Path(sys.executable).parent / "py-spy")
    spies = []
    for pid in pids:
        out = f"{directory}/{name}-{pid}.txt"
        argv = [spy_bin, "record", "-r", "100", "-f", "raw", "-o", out, "-p", str(pid)]
        argv += os.environ.get("BENCH_PYSPY_ARGS", "").split()  # e.g. --gil
        spies.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    try:
        yield
    finally:
        for spy in spies:
            spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        for spy in spies:
            try:
                spy.wait(30)
            except subprocess.TimeoutExpired:
                spy.kill()


async def _seed(path: Path | str, conversations: list[dict[str, Any]]) -> None:
    from protocol import format_timestamp
    from storage.records import Conversation
    from storage.store.base import Store
    from storage.store.postgres import PostgresStore
    from storage.store.sqlite import SqliteStore

    store: Store = PostgresStore(path) if isinstance(path, str) else SqliteStore(str(path))
    await store.start()
    try:
        now = format_timestamp(datetime.now(UTC))
        for item in conversations:
            for user in item["members"]:
                await store.ensure_user(user, "free", "user")
            await store.create_conversation(
                Conversation(
                    id=item["id"],
                    agent_id="general",
                    title="bench",
                    owner_id=item["members"][0],
                    members=tuple(item["members"]),
                    created_at=now,
                    updated_at=now,
                )
            )
    finally:
        await store.close()


def seed_conversations(store: Path | str, conversations: list[dict[str, Any]]) -> None:
    """Create conversations ({id, members}) straight in a store, a SQLite file or a Postgres
    DSN (REST caps members at 100); the servers started on it afterwards serve them."""
    if isinstance(store, Path):
        store.parent.mkdir(parents=True, exist_ok=True)
    asyncio.run(_seed(store, conversations))


def write_listing(path: Path, conversations: list[dict[str, Any]]) -> Path:
    """The ``--conversations-file`` the harness reads."""
    path.write_text(json.dumps(conversations))
    return path


def machine() -> dict[str, Any]:
    load1, load5, _ = os.getloadavg()
    return {
        "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        # Syscall-bound peers (one send per delivery) move with the kernel and the machine
        # more than chatserver does: runs on different machines differ in their ratios.
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_avg_1m_at_start": round(load1, 2),
        "load_avg_5m_at_start": round(load5, 2),
        "note": "2 cores shared with other engineers' test runs: noisy; compare ratios "
        "within one run",
    }


def _cpu_model() -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return None


def git_commit() -> str:
    """The commit measured (``+dirty`` when the tree has changes), for the docs' labels."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def write_result(name: str, data: dict[str, Any], out: Path | None = None) -> Path:
    directory = out or RESULTS
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    log(f"wrote {path}")
    print(data.get("markdown", ""))
    return path


def slim(report: dict[str, Any]) -> dict[str, Any]:
    """A harness report without the bulky parts (the config stays, minus secrets)."""
    return {k: v for k, v in report.items() if k not in ("errors",)} | {
        "errors": report.get("errors", [])[:5]
    }


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 3)


def verdict(ok: bool | None) -> str:
    if ok is None:
        return "not measured"
    return "met" if ok else "NOT met"


def base_args(quick: bool) -> dict[str, Any]:
    return {"quick": quick, "started_at": datetime.now(UTC).isoformat(timespec="seconds")}
