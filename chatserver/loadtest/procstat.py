"""CPU time and resident memory of processes, from /proc (Linux)."""

from __future__ import annotations

import os

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of ``pid`` (its threads included), None if unreadable."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            raw = handle.read()
    except OSError:
        return None
    fields = raw[raw.rindex(b")") + 2 :].split()  # the name may hold spaces and parens
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of stat(5)
    return (utime + stime) / _TICKS


def rss_kib(pid: int) -> int | None:
    """Resident set size in KiB, None if unreadable."""
    try:
        with open(f"/proc/{pid}/status", "rb") as handle:
            for line in handle:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def sample(pids: list[int]) -> dict[str, dict[str, float | int | None]]:
    return {str(pid): {"cpu_s": cpu_seconds(pid), "rss_kib": rss_kib(pid)} for pid in pids}


def own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system
