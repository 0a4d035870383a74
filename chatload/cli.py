"""``chatserver loadtest``: flags in, a JSON report out, exit 1 when an SLO is missed."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from .config import ConfigError, add_flags, from_args
from .report import summary_line
from .runner import run_loadtest


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "loadtest",
        help="drive a server with N clients and report latency, loss and CPU",
        description=sys.modules[__name__.rpartition(".")[0]].__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_flags(parser)
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    try:
        config = from_args(args)
    except ConfigError as exc:
        print(f"chatserver loadtest: {exc}", file=sys.stderr)
        return 2
    try:
        report = asyncio.run(run_loadtest(config))
    except ConfigError as exc:
        print(f"chatserver loadtest: {exc}", file=sys.stderr)
        return 2
    text = json.dumps(report, indent=2)
    if config.out:
        Path(config.out).parent.mkdir(parents=True, exist_ok=True)
        Path(config.out).write_text(text + "\n")
    else:
        print(text)
    print(summary_line(report), file=sys.stderr)
    for check in report["slo"]["checks"]:
        if not check["ok"]:
            print(
                f"SLO missed: {check['name']} = {check['value']} > {check['limit']}",
                file=sys.stderr,
            )
    return 0 if report["slo"]["ok"] else 1
