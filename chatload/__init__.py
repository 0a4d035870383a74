"""The load-test harness: ``chatserver loadtest``.

N clients ramped up over a time, in conversations of M members, sending at a rate (or flat
out) for a duration, in one of three modes: ``idle`` (connections only), ``chat`` (members
talk; every message fans out to every member) and ``ai`` (every message gets an agent reply).
Worker processes (``--procs``) share the clients; each client is a lean raw-protocol
WebSocket (``wsclient``), so the harness is not the bottleneck it would be on aiohttp.

The report holds latency histograms (ack, delivery, time to first token, gaps between
deltas, plus connect, join and REST), counts (sent, acked, delivered, lost, duplicated,
reordered), the harness's own CPU, and the CPU and memory of the server processes named with
``--server-pid``. SLO flags make the command exit 1 when missed.
"""

from .config import LoadConfig
from .runner import run_loadtest

__all__ = ["LoadConfig", "run_loadtest"]
