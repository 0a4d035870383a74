"""What an instance's memory holds: its resident size, the Python heap, how full each bounded
structure is, and, with ``CHAT_TRACEMALLOC_FRAMES`` set, the allocation sites that grew.

Read by operators and by ``bench/soak.py`` through the admin routes (``chatserver/http/
admin.py``). The cheap part (``stats``) is a few system calls and a walk over the bounded
structures' ``len``; the sites (``mark``, ``growth``) take a ``tracemalloc`` snapshot, which
copies every live traced block for a moment and holds the event loop meanwhile (about a
second per million blocks): an operator's or a benchmark's tool, never a probe's.

What is kept between two calls is bounded by the code, not by the heap: the baseline is the
snapshot grouped by allocation site (its traceback), so one entry per site.
"""

from __future__ import annotations

import gc
import os
import sys
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

# (entries held now, the most it may hold): a bounded structure's fill.
Fill = tuple[int, int]
Sizes = Callable[[], Mapping[str, Fill]]

_ROOT = str(Path(__file__).resolve().parents[2]) + os.sep
_PREFIXES = sorted(
    {_ROOT, *(p + os.sep for p in (*sys.path, sys.prefix) if p and p != ".")},
    key=len,
    reverse=True,
)
_IGNORED = (
    tracemalloc.Filter(False, tracemalloc.__file__),
    tracemalloc.Filter(False, __file__),  # the baseline this module keeps is not the server's
    tracemalloc.Filter(False, "<frozen importlib._bootstrap>"),
    tracemalloc.Filter(False, "<frozen importlib._bootstrap_external>"),
    tracemalloc.Filter(False, "<unknown>"),
)
MAX_TOP = 100


@runtime_checkable
class Fills(Protocol):
    """A part holding bounded structures: their fill by name (entries, or bytes where the
    name says so, and the bound)."""

    def fill(self) -> Mapping[str, Fill]: ...


@dataclass
class Bounded:
    """The bounded structures of an app, each reporting its own fill (``Sizes``).

    A part registers its structures when it is made (in its cleanup context); the metrics
    sampler and the admin route read them all by name.
    """

    sources: list[Sizes] = field(default_factory=list)

    def add(self, sizes: Sizes) -> None:
        self.sources.append(sizes)

    def watch(self, *parts: object) -> None:
        """Add each part that holds bounded structures (an implementation may hold none:
        the Redis window keeps its records in Redis, the memory one in process)."""
        for part in parts:
            if isinstance(part, Fills):
                self.add(part.fill)

    def fill(self) -> dict[str, Fill]:
        out: dict[str, Fill] = {}
        for sizes in self.sources:
            out.update(sizes())
        return out


def rss_bytes() -> int | None:
    """Resident set size of this process (Linux ``/proc``), None elsewhere."""
    try:
        with open("/proc/self/statm", "rb") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class HeapProfiler:
    """``tracemalloc`` when ``frames`` > 0 (started by ``start``), and the heap's figures."""

    def __init__(self, frames: int) -> None:
        self.frames = frames
        self._started = False
        self._baseline: dict[tracemalloc.Traceback, tuple[int, int]] | None = None

    @property
    def tracing(self) -> bool:
        return tracemalloc.is_tracing()

    def start(self) -> None:
        if self.frames > 0 and not tracemalloc.is_tracing():
            tracemalloc.start(self.frames)
            self._started = True

    def stop(self) -> None:
        self._baseline = None
        if self._started:
            tracemalloc.stop()
            self._started = False

    def stats(self) -> dict[str, Any]:
        """Cheap: no snapshot (a sampler may call this every few seconds)."""
        out: dict[str, Any] = {
            "rss_bytes": rss_bytes(),
            "allocated_blocks": sys.getallocatedblocks(),
            "gc": {
                "counts": list(gc.get_count()),
                "collections": [g["collections"] for g in gc.get_stats()],
                "collected": [g["collected"] for g in gc.get_stats()],
                "uncollectable": [g["uncollectable"] for g in gc.get_stats()],
                "frozen": gc.get_freeze_count(),
            },
            "tracemalloc": None,
        }
        if tracemalloc.is_tracing():
            traced, peak = tracemalloc.get_traced_memory()
            out["tracemalloc"] = {
                "frames": tracemalloc.get_traceback_limit(),
                "traced_bytes": traced,
                "peak_bytes": peak,
                "overhead_bytes": tracemalloc.get_tracemalloc_memory(),
            }
        return out

    def collect(self, top: int = 0) -> dict[str, Any]:
        """A full collection now; with ``top``, the types most found in the cyclic garbage
        it freed (kept aside for the count, then let go): what the per-reply paths leave to
        the collector instead of freeing by reference counting."""
        blocks = sys.getallocatedblocks()
        started = time.perf_counter()
        kinds: Counter[str] = Counter()
        if top > 0:
            flags = gc.get_debug()
            gc.set_debug(flags | gc.DEBUG_SAVEALL)
            try:
                collected = gc.collect()
                kinds.update(_type_name(o) for o in gc.garbage)
            finally:
                gc.garbage.clear()
                gc.set_debug(flags)
            collected = max(collected, gc.collect())  # what the saved objects held
        else:
            collected = gc.collect()
        return {
            "collected": collected,
            "seconds": round(time.perf_counter() - started, 4),
            "blocks_before": blocks,
            "blocks_after": sys.getallocatedblocks(),
            "garbage_types": [
                {"type": name, "count": n} for name, n in kinds.most_common(min(top, MAX_TOP))
            ],
        }

    def mark(self) -> dict[str, Any]:
        """Take the baseline that ``growth`` compares with (replacing the previous one)."""
        self._baseline = _by_site(self._snapshot())
        traced, _ = tracemalloc.get_traced_memory()
        return {"traced_bytes": traced, "sites": len(self._baseline)}

    def growth(self, top: int) -> dict[str, Any]:
        """The ``top`` sites whose live bytes grew most since ``mark`` (or since tracing
        started, when no baseline was taken)."""
        now = _by_site(self._snapshot())
        before = self._baseline or {}
        rows = []
        for site in now.keys() | before.keys():
            size, count = now.get(site, (0, 0))
            size0, count0 = before.get(site, (0, 0))
            if size != size0:
                rows.append((size - size0, count - count0, size, count, site))
        rows.sort(key=lambda row: row[0], reverse=True)
        traced, _ = tracemalloc.get_traced_memory()
        return {
            "since_mark": self._baseline is not None,
            "traced_bytes": traced,
            "grown_bytes": sum(row[0] for row in rows),
            "sites": [
                {
                    "size_diff": d_size,
                    "count_diff": d_count,
                    "size": size,
                    "count": count,
                    "traceback": _frames(site),
                }
                for d_size, d_count, size, count, site in rows[: max(1, min(top, MAX_TOP))]
            ],
        }

    def _snapshot(self) -> tracemalloc.Snapshot:
        if not tracemalloc.is_tracing():
            raise RuntimeError("tracemalloc is not tracing (CHAT_TRACEMALLOC_FRAMES=0)")
        return tracemalloc.take_snapshot().filter_traces(_IGNORED)


def _type_name(obj: object) -> str:
    kind = type(obj)
    return f"{kind.__module__}.{kind.__qualname__}"


def _by_site(snapshot: tracemalloc.Snapshot) -> dict[tracemalloc.Traceback, tuple[int, int]]:
    return {s.traceback: (s.size, s.count) for s in snapshot.statistics("traceback")}


def _frames(traceback: Iterable[tracemalloc.Frame]) -> list[str]:
    """``path:line`` of each frame, the allocating one first, paths short."""
    return [f"{_short(frame.filename)}:{frame.lineno}" for frame in reversed(list(traceback))]


def _short(path: str) -> str:
    """Relative to the longest of the repository and ``sys.path`` that holds it (a virtual
    environment's site-packages may live inside the repository)."""
    for prefix in _PREFIXES:
        if path.startswith(prefix):
            return path[len(prefix) :]
    return path
