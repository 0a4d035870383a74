"""What a Redis server did during the run, from ``INFO`` (``--redis-info URL``).

Sampled at the same two instants as the servers' CPU (when the run starts and when the last
report is in), and reported as the difference:

- ``commands``: the sum of ``INFO commandstats`` calls, and ``by_command``: per command. Redis
  7 counts the commands a Lua script calls as well as the ``EVALSHA`` itself (a script of
  three calls is four commands), and a ``MULTI``/``EXEC`` block as its commands plus two;
  ``scripts`` counts the ``EVAL``/``EVALSHA``/``FCALL`` calls alone;
- ``round_trips``: ``total_reads_processed`` of ``INFO stats``, the read events Redis
  handled on client sockets. A client that writes a request (one command, a pipeline or a
  ``MULTI`` block) and waits for the answer makes one; so this counts round trips, not
  commands (a pipeline of ten is one). Requests written back to back on one connection
  without waiting may be read at once and count once; a request larger than Redis's 16 KiB
  read buffer counts more than once; a connection that closes counts one (its end of file);
- ``net_input_bytes`` / ``net_output_bytes``: ``total_net_input_bytes`` and
  ``total_net_output_bytes`` (output includes pub/sub deliveries to subscribers);
- ``cpu_s``: ``used_cpu_sys`` + ``used_cpu_user`` of ``INFO cpu`` (the whole process).

The sampling's own traffic is taken out: each sample is one ``INFO`` on a connection of its
own, so the delta holds one ``info`` command (the last sample's) and two reads (the last
sample's ``INFO`` and the first sample's connection closing), subtracted per server.
"""

from __future__ import annotations

import socket
from typing import Any
from urllib.parse import urlparse

SCRIPT_COMMANDS = ("eval", "evalsha", "eval_ro", "evalsha_ro", "fcall", "fcall_ro")

Sample = dict[str, Any]


def sample(urls: list[str]) -> dict[str, Sample | None]:
    """``INFO all`` of every URL (None where Redis did not answer)."""
    return {url: _info(url) for url in urls}


def _info(url: str) -> Sample | None:
    try:
        text = _info_text(url)
    except (OSError, ValueError):
        return None
    calls: dict[str, int] = {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        if key.startswith("cmdstat_"):  # cmdstat_get:calls=11,usec=...
            stats = dict(part.split("=", 1) for part in value.split(",") if "=" in part)
            calls[key.removeprefix("cmdstat_")] = int(stats.get("calls", 0))
        else:
            fields[key] = value
    return {
        "calls": calls,
        "reads": int(fields.get("total_reads_processed", 0)),
        "net_in": int(fields.get("total_net_input_bytes", 0)),
        "net_out": int(fields.get("total_net_output_bytes", 0)),
        "cpu_s": float(fields.get("used_cpu_sys", 0)) + float(fields.get("used_cpu_user", 0)),
    }


def _info_text(url: str) -> str:
    """``INFO all`` over a plain socket: one command and one read at the server, no hand-shake
    (a client library may first send ``HELLO`` or ``CLIENT SETINFO``, which would count)."""
    parsed = urlparse(url)
    address = (parsed.hostname or "127.0.0.1", parsed.port or 6379)
    with socket.create_connection(address, timeout=5) as sock:
        sock.sendall(b"*2\r\n$4\r\nINFO\r\n$3\r\nall\r\n")
        data = b""
        while b"\r\n" not in data:
            data += _recv(sock)
        head, _, body = data.partition(b"\r\n")
        if not head.startswith(b"$"):
            raise ValueError(f"INFO answered {head[:200]!r}")
        size = int(head[1:])
        while len(body) < size:
            body += _recv(sock)
    return body[:size].decode("utf-8", "replace")


def _recv(sock: socket.socket) -> bytes:
    chunk = sock.recv(1 << 16)
    if not chunk:
        raise ValueError("Redis closed the connection")
    return chunk


def delta(start: dict[str, Sample | None], end: dict[str, Sample | None]) -> dict[str, Any]:
    """What every Redis did between the two samples, summed over the servers."""
    by_command: dict[str, int] = {}
    reads = net_in = net_out = 0
    cpu = 0.0
    measured = 0
    for url, first in start.items():
        last = end.get(url)
        if first is None or last is None:
            continue
        measured += 1
        for name, calls in last["calls"].items():
            grown = calls - first["calls"].get(name, 0) - (1 if name == "info" else 0)
            if grown > 0:
                by_command[name] = by_command.get(name, 0) + grown
        reads += last["reads"] - first["reads"] - 2
        net_in += last["net_in"] - first["net_in"]
        net_out += last["net_out"] - first["net_out"]
        cpu += last["cpu_s"] - first["cpu_s"]
    if not measured:
        return {"urls": list(start), "measured": 0}
    ordered = dict(sorted(by_command.items(), key=lambda item: (-item[1], item[0])))
    return {
        "urls": list(start),
        "measured": measured,
        "commands": sum(ordered.values()),
        "scripts": sum(ordered.get(name, 0) for name in SCRIPT_COMMANDS),
        "by_command": ordered,
        "round_trips": max(0, reads),
        "net_input_bytes": net_in,
        "net_output_bytes": net_out,
        "cpu_s": round(cpu, 3),
    }


def per(figures: dict[str, Any], count: int) -> dict[str, Any]:
    """The counts of a ``delta`` per unit (a reply, a message), rounded; {} if unmeasured."""
    if not count or not figures.get("measured"):
        return {}
    return {
        "commands": round(figures["commands"] / count, 2),
        "scripts": round(figures["scripts"] / count, 2),
        "round_trips": round(figures["round_trips"] / count, 2),
        "net_input_bytes": round(figures["net_input_bytes"] / count),
        "cpu_us": round(figures["cpu_s"] * 1e6 / count, 1),
        "by_command": {
            name: round(calls / count, 2) for name, calls in figures["by_command"].items()
        },
    }
