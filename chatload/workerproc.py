"""A load-test worker process, as the coordinator runs it.

    python -m chatload.workerproc

It talks JSON lines: stdin brings ``init`` (the config, the worker's index, the ramp start,
the board of a flat-out chat load's shared windows: ``flow``),
``go`` and ``expect``; stdout carries ``ready``, ``progress`` (every second), ``sent`` and
``report``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from typing import Any

from .config import LoadConfig
from .flow import DoneBoard
from .worker import Worker


async def _commands() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 28)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


async def _read(reader: asyncio.StreamReader, expect: str) -> dict[str, Any]:
    line = await reader.readline()
    if not line:
        raise SystemExit(f"loadtest worker: the coordinator went away before {expect!r}")
    message: dict[str, Any] = json.loads(line)
    if message.get("cmd") != expect:
        raise SystemExit(f"loadtest worker: expected {expect!r}, got {message.get('cmd')!r}")
    return message


async def _ticker(worker: Worker) -> None:
    while True:
        await asyncio.sleep(1.0)
        worker.emit(worker.progress())


async def main_async() -> None:
    reader = await _commands()
    init = await _read(reader, "init")
    config = LoadConfig.from_wire(init["config"])
    index = int(init["index"])
    board = None
    if init.get("board"):
        board = DoneBoard(str(init["board"]), config.procs, config.clients, index)
    worker = Worker(config, index, board=board)
    ticker = asyncio.create_task(_ticker(worker))
    try:
        await worker.ramp(int(init["t0_ns"]))
        worker.emit({**worker.progress(), "ev": "ready"})
        go = await _read(reader, "go")
        await worker.run(int(go["t_go_ns"]))
        worker.emit({"ev": "sent", "acked": {str(k): v for k, v in worker.acked.items()}})
        expect = await _read(reader, "expect")
        await worker.drain({int(k): int(v) for k, v in expect["acked"].items()})
        worker.emit(worker.report())
    finally:
        ticker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticker
        await worker.close_all()
        if board is not None:
            board.close()


def main() -> None:
    try:
        import uvloop

        uvloop.run(main_async())
    except ImportError:  # pragma: no cover
        asyncio.run(main_async())


if __name__ == "__main__":
    main()
