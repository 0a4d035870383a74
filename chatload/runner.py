"""The coordinator: prepares conversations, runs the workers in step, prints progress, reports.

Phases, in step across the worker processes: ramp (every client connects, gets ``hello``,
joins its conversation) -> hold -> go (all start sending at one instant) -> stop sending and
wait for the acks -> expect (each worker is told how many messages every conversation had
acked, and waits until its members got them all, or the drain timeout) -> report.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from . import procstat, redisstat
from .config import ConfigError, LoadConfig, http_base
from .flow import create_board
from .report import build_report

_READY_GRACE_S = 60.0


class WorkerProc:
    def __init__(self, index: int, proc: asyncio.subprocess.Process) -> None:
        self.index = index
        self.proc = proc
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.progress: dict[str, Any] = {}
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while True:
            line = await self.proc.stdout.readline()
            if not line:
                await self.events.put({"ev": "exit"})
                return
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("ev") == "progress":
                self.progress = event
            else:
                if event.get("ev") == "ready":
                    self.progress = event
                await self.events.put(event)

    async def send(self, message: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(message, separators=(",", ":")) + "\n").encode())
        await self.proc.stdin.drain()

    async def expect(self, kind: str, timeout: float) -> dict[str, Any]:
        event = await asyncio.wait_for(self.events.get(), timeout)
        if event.get("ev") != kind:
            raise RuntimeError(f"worker {self.index}: expected {kind!r}, got {event.get('ev')!r}")
        return event


async def prepare_conversations(config: LoadConfig) -> None:
    """Conversations of several members are created here (their owner's token, REST)."""
    if config.conversations_file:
        data = json.loads(Path(config.conversations_file).read_text())  # noqa: ASYNC240
        config.conversation_ids = [str(item["id"]) for item in data]
        if len(config.conversation_ids) < config.conversations:
            raise ConfigError(
                f"--conversations-file has {len(config.conversation_ids)} conversations, "
                f"the run needs {config.conversations}"
            )
        return
    if config.dialect != "chatserver" or config.mode == "idle" or config.members == 1:
        return  # peers need no creation; one-member conversations are made by their worker
    import aiohttp

    from chatserver.auth import Authenticator

    base = http_base(config.urls[0])
    auth = Authenticator(config.jwt_secret) if config.jwt_secret else None
    gate = asyncio.Semaphore(32)
    async with aiohttp.ClientSession() as http:

        async def token(user: str) -> str:
            if auth is not None:
                return auth.issue(user, config.tier, ttl_s=6 * 3600)
            async with http.post(
                f"{base}/api/dev/token", json={"user_id": user, "tier": config.tier}
            ) as response:
                return str((await response.json(content_type=None))["token"])

        async def create(conv: int) -> str:
            first = conv * config.members
            last = min(first + config.members, config.clients)
            members = [config.user_id(i) for i in range(first, last)]
            async with gate:
                headers = {"Authorization": f"Bearer {await token(members[0])}"}
                async with http.post(
                    f"{base}/api/conversations",
                    json={"agent_id": config.agent_id, "members": members[1:]},
                    headers=headers,
                ) as response:
                    body = await response.json(content_type=None)
                    if response.status != 201:
                        raise ConfigError(f"creating a conversation: {response.status} {body}")
                    return str(body["id"])

        config.conversation_ids = list(
            await asyncio.gather(*(create(c) for c in range(config.conversations)))
        )


class Progress:
    def __init__(self, config: LoadConfig) -> None:
        self.config = config
        self.tty = sys.stderr.isatty()
        self.started = time.monotonic()
        self.last: dict[str, float] = {}
        self.last_at = self.started
        self.phase = "ramp"
        self.cpu0 = procstat.own_cpu_seconds()

    def line(self, workers: list[WorkerProc]) -> str:
        total: dict[str, float] = {}
        for worker in workers:
            for key, value in worker.progress.items():
                if isinstance(value, int | float):
                    total[key] = total.get(key, 0) + value
        now = time.monotonic()
        span = max(1e-6, now - self.last_at)

        def rate(key: str) -> float:
            return (total.get(key, 0) - self.last.get(key, 0)) / span

        cpu = rate("cpu_s") * 100
        text = (
            f"[{now - self.started:6.1f}s {self.phase:>5}] "
            f"conns {int(total.get('connected', 0))}/{self.config.clients}"
            f" fail {int(total.get('failed', 0))}"
            f" | sent {int(total.get('sent', 0))} ({rate('sent'):.0f}/s)"
            f" acked {int(total.get('acked', 0))}"
            f" | delivered {int(total.get('delivered', 0))} ({rate('delivered'):.0f}/s)"
        )
        if self.config.mode == "ai":
            text += f" deltas {rate('deltas'):.0f}/s replies {int(total.get('replies', 0))}"
        text += f" | drops {int(total.get('disconnects', 0))} | harness cpu {cpu:.0f}%"
        self.last = total
        self.last_at = now
        return text

    async def run(self, workers: list[WorkerProc]) -> None:
        if self.config.quiet:
            return
        while True:
            await asyncio.sleep(self.config.progress_s)
            text = self.line(workers)
            if self.tty:
                sys.stderr.write("\r" + text[:200].ljust(200))
            else:
                sys.stderr.write(text + "\n")
            sys.stderr.flush()


async def run_loadtest(config: LoadConfig) -> dict[str, Any]:
    config.validate()
    await prepare_conversations(config)
    pids = config.server_pids
    sample_start = procstat.sample(pids + config.aux_pids)
    t0_ns = time.monotonic_ns() + int(0.5e9)
    # Flat-out chat over several workers: a sender's window waits on every worker's members.
    board = ""
    if config.mode == "chat" and config.rate == 0 and config.procs > 1:
        board = create_board(config.procs, config.clients)
    try:
        return await _run_workers(config, t0_ns, board, sample_start)
    finally:
        if board:
            with contextlib.suppress(OSError):
                os.unlink(board)


async def _run_workers(
    config: LoadConfig,
    t0_ns: int,
    board: str,
    sample_start: dict[str, dict[str, float | int | None]],
) -> dict[str, Any]:
    pids = config.server_pids
    workers: list[WorkerProc] = []
    for index in range(config.procs):
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "chatload.workerproc",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=1 << 28,
        )
        worker = WorkerProc(index, proc)
        workers.append(worker)
        await worker.send(
            {"cmd": "init", "config": config.wire(), "index": index, "t0_ns": t0_ns, "board": board}
        )
    progress = Progress(config)
    ticker = asyncio.create_task(progress.run(workers))
    try:
        wait = config.ramp_s + 3 * config.connect_timeout_s + _READY_GRACE_S
        ready = [await w.expect("ready", wait) for w in workers]
        ramp_done = time.monotonic()
        if config.hold_s:
            progress.phase = "hold"
            await asyncio.sleep(config.hold_s)
        sample_idle = procstat.sample(pids + config.aux_pids)
        progress.phase = "run"
        t_go_ns = time.monotonic_ns() + int(0.2e9)
        for worker in workers:
            await worker.send({"cmd": "go", "t_go_ns": t_go_ns})
        sample_go = procstat.sample(pids + config.aux_pids)
        redis_go = redisstat.sample(config.redis_urls)
        cpu_go = procstat.own_cpu_seconds()
        wait = config.duration_s + config.ack_timeout_s + 30
        sent = [await w.expect("sent", wait) for w in workers]
        progress.phase = "drain"
        acked: dict[str, int] = {}
        for event in sent:
            for conv, count in event["acked"].items():
                acked[conv] = acked.get(conv, 0) + int(count)
        for worker in workers:
            await worker.send({"cmd": "expect", "acked": acked})
        reports = [await w.expect("report", config.drain_timeout_s + 30) for w in workers]
        sample_end = procstat.sample(pids + config.aux_pids)
        redis_end = redisstat.sample(config.redis_urls)
        end_ns = time.monotonic_ns()
    finally:
        ticker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticker
        if progress.tty and not config.quiet:
            sys.stderr.write("\n")
        for worker in workers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(worker.proc.wait(), 15)
            if worker.proc.returncode is None:
                worker.proc.kill()
                await worker.proc.wait()
            worker.reader.cancel()
    return build_report(
        config,
        reports,
        ready,
        samples={"start": sample_start, "idle": sample_idle, "go": sample_go, "end": sample_end},
        t_go_ns=t_go_ns,
        end_ns=end_ns,
        ramp_s=ramp_done - progress.started,
        coordinator_cpu_s=procstat.own_cpu_seconds() - cpu_go,
        redis=redisstat.delta(redis_go, redis_end) if config.redis_urls else None,
    )
