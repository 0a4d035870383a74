"""CPU time and resident memory of processes, from /proc (Linux)."""

from __future__ import annotations

import os

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int, thread: int | None = None) -> float | None:
    """User + system CPU seconds of ``pid`` (its threads included), None if unreadable.

    With ``thread``, of that one thread only: ``thread=pid`` is the main thread, the one that
    runs an asyncio server's event loop (its other threads are executors and the like).
    """
    path = f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat"
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except OSError:
        return None
    fields = raw[raw.rindex(b")") + 2 :].split()  # the name may hold spaces and parens
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of stat(5)
    return (utime + stime) / _TICKS


def rss_kib(pid: int) -> int | None:
    """Resident set size in KiB, None if unreadable."""
    return _field(f"/proc/{pid}/status", b"VmRSS:")


def write_syscalls(pid: int) -> int | None:
    """Write-family system calls ``pid`` made so far (``syscw`` of proc(5)'s io), or None."""
    return _field(f"/proc/{pid}/io", b"syscw:")  # readable by the owner or root


def _field(path: str, key: bytes) -> int | None:
    """The number after ``key`` on its line of a /proc file, None if unreadable or absent."""
    try:
        with open(path, "rb") as handle:
            for line in handle:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def sample(pids: list[int]) -> dict[str, dict[str, float | int | None]]:
    return {
        str(pid): {
            "cpu_s": cpu_seconds(pid),
            "loop_cpu_s": cpu_seconds(pid, pid),
            "rss_kib": rss_kib(pid),
            "syscw": write_syscalls(pid),
        }
        for pid in pids
    }


def own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system
