"""A sender's window across worker processes: a board of how far each worker's members got.

Flat out, a message leaves its sender's window when every member of the conversation has it.
The members are spread over the worker processes, so a worker that counted only its own would
let its senders run ahead of a worker that is starved of CPU on a busy machine: the server
queues megabytes for that worker's connections and, as the protocol says, closes them (4408,
slow consumer), and the run counts the deliveries they missed as lost.

So the workers share one file, mapped into each, of 64-bit counters: one row per worker, one
cell per client index, the number of that client's messages that every member in the worker
has. Each worker writes only its own row (one writer per cell, aligned 8-byte stores); a
sender may have ``window`` messages beyond the least of its cells over every worker. A cell of
a worker with no member of the sender's conversation holds ``NO_LIMIT`` and never holds it
back. A worker learns of another's progress by looking again every millisecond
(``Sending.follow_board``); its own members' progress releases its senders at once.
"""

from __future__ import annotations

import mmap
import os
import tempfile
from array import array
from collections.abc import Iterable

NO_LIMIT = 1 << 62
_CELL = 8


def create_board(procs: int, clients: int) -> str:
    """A new board file for ``procs`` workers of ``clients`` clients, every cell unlimited;
    its path (the caller removes it). In memory (``/dev/shm``) where there is one."""
    shm = "/dev/shm"
    where = shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None
    fd, path = tempfile.mkstemp(prefix="chatload-board-", dir=where)
    with os.fdopen(fd, "wb") as out:
        out.write(array("q", [NO_LIMIT] * (procs * clients)).tobytes())
    return path


class DoneBoard:
    """One worker's view of the board: its own row to write, every row to read."""

    __slots__ = ("_cells", "_file", "_map", "_own", "_rows")

    def __init__(self, path: str, procs: int, clients: int, index: int) -> None:
        self._rows = [w * clients for w in range(procs)]
        self._own = index * clients
        self._file = open(path, "r+b")  # noqa: SIM115 (held open with the map; closed by close)
        self._map = mmap.mmap(self._file.fileno(), procs * clients * _CELL)
        self._cells = memoryview(self._map).cast("q")

    def watch(self, senders: Iterable[int]) -> None:
        """This worker has members of these senders' conversations: it holds them back."""
        for sender in senders:
            self._cells[self._own + sender] = 0

    def done(self, sender: int) -> None:
        """Every member here has one more of ``sender``'s messages."""
        self._cells[self._own + sender] += 1

    def least(self, sender: int) -> int:
        """How many of ``sender``'s messages every member, in every worker, has."""
        cells = self._cells
        return min(cells[row + sender] for row in self._rows)

    def close(self) -> None:
        self._cells.release()
        self._map.close()
        self._file.close()
