"""Memory per idle authenticated connection, beside the peers, in one run.

    .venv/bin/python bench/connections.py [--clients 10000] [--quick]

Each server is started alone (chatserver on the embedded default with a JWT secret; the
bare aiohttp peer; the python-socketio peer), then the harness opens ``--clients`` idle
connections to it (chatserver: authenticated with a Bearer JWT, ``hello`` received;
socketio: the namespace connected) over a ramp, holds them, and the server's resident memory
growth (VmRSS after the ramp and a hold, minus before the first connection) is divided by the
connections. Writes ``bench/results/connections.json``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    base_args,
    chatservers,
    load,
    log,
    machine,
    peers,
    pid_of,
    ratio,
    slim,
    verdict,
    write_result,
)

GOAL_KIB = 18.0


def measure(label: str, url: str, pid: int, dialect: str, args: argparse.Namespace) -> Any:
    return load(
        label=label,
        urls=[url],
        dialect=dialect,
        mode="idle",
        clients=args.clients,
        members=1,
        ramp_s=args.ramp,
        hold_s=args.hold,
        duration_s=0.5,
        procs=2,
        server_pids=[pid],
        max_errors=0,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=10_000)
    parser.add_argument("--ramp", type=float, default=12.0)
    parser.add_argument("--hold", type=float, default=3.0)
    parser.add_argument("--quick", action="store_true", help="300 connections, seconds")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.quick:
        args.clients, args.ramp, args.hold = 300, 1.0, 0.5
    results: dict[str, Any] = {}
    log(f"connections: {args.clients} idle connections per server")
    with chatservers(1) as servers:
        results["chatserver"] = measure(
            "chatserver", servers[0].url, pid_of(servers[0]), "chatserver", args
        )
    with peers("bare", 1) as started:
        results["bare_aiohttp"] = measure(
            "bare aiohttp", started[0].url, started[0].pid, "peer", args
        )
    with peers("sio", 1) as started:
        results["python_socketio"] = measure(
            "python-socketio", started[0].url, started[0].pid, "socketio", args
        )
    kib = {name: r["server"]["kib_per_connection"] for name, r in results.items()}
    connected = {name: r["connections"]["connected"] for name, r in results.items()}
    ok = kib["chatserver"] is not None and kib["chatserver"] <= GOAL_KIB
    ok = ok and connected["chatserver"] == args.clients
    markdown = "\n".join(
        [
            "| server | connections held | KiB per idle connection | harness CPU |",
            "|---|---|---|---|",
            *(
                f"| {name} | {connected[name]}/{args.clients} | {kib[name]} | "
                f"{results[name]['harness']['cpu_s']} s |"
                for name in results
            ),
            "",
            f"Goal ≤ {GOAL_KIB} KiB: **{verdict(ok)}** (chatserver {kib['chatserver']} KiB, "
            f"{ratio(kib['chatserver'], kib['bare_aiohttp'])}x bare aiohttp, "
            f"{ratio(kib['chatserver'], kib['python_socketio'])}x python-socketio).",
        ]
    )
    write_result(
        "connections",
        {
            "scenario": "connections",
            **base_args(args.quick),
            "machine": machine(),
            "clients": args.clients,
            "kib_per_connection": kib,
            "goal_kib": GOAL_KIB,
            "goal_met": ok,
            "markdown": markdown,
            "runs": {name: slim(r) for name, r in results.items()},
        },
        args.out,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
