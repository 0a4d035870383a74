"""The `chatserver` command: serve, token."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from aiohttp import web

from . import logs
from .auth import AuthError, Authenticator
from .settings import SettingsError, add_flags, load

log = logging.getLogger("chatserver")


def _serve(args: argparse.Namespace) -> int:
    settings = load(args)
    logs.configure(settings.log_level, settings.server_id)
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux/macOS
        pass
    from .app import create_app

    app = create_app(settings)
    log.info("settings", extra={"settings": settings.public_dict()})

    def announce(_: object) -> None:
        host = settings.host if settings.host not in ("0.0.0.0", "::") else "127.0.0.1"
        print(f"chatserver listening on http://{host}:{settings.port}/", flush=True)

    web.run_app(
        app,
        host=settings.host,
        port=settings.port,
        print=announce,
        access_log=logging.getLogger("aiohttp.access"),
        shutdown_timeout=settings.shutdown_grace_s + 5,
        handle_signals=True,
    )
    return 0


def _token(args: argparse.Namespace) -> int:
    secret = os.environ.get("CHAT_JWT_SECRET")
    if not secret:
        print("chatserver token: CHAT_JWT_SECRET is not set", file=sys.stderr)
        return 2
    try:
        print(Authenticator(secret).issue(args.user, args.tier, args.role, args.ttl))
    except AuthError as exc:
        print(f"chatserver token: {exc}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chatserver", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the server (no settings: embedded default)")
    add_flags(serve)
    serve.set_defaults(func=_serve)
    token = commands.add_parser("token", help="print a client token signed with CHAT_JWT_SECRET")
    token.add_argument("--user", required=True, help="user id (the token's sub)")
    token.add_argument("--tier", default="free", choices=["free", "pro", "enterprise"])
    token.add_argument("--role", default="user", choices=["user", "admin"])
    token.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds")
    token.set_defaults(func=_token)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result: int = args.func(args)
    except SettingsError as exc:
        print(f"chatserver: invalid setting: {exc}", file=sys.stderr)
        return 2
    return result


if __name__ == "__main__":
    sys.exit(main())
