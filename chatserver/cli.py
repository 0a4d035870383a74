"""The `chatserver` command: serve, token, migrate, partitions."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import sys
from collections.abc import Callable

from aiohttp import web

from .auth import AuthError, authenticator
from .ops import logs
from .ops.logs import JsonAccessLogger
from .settings import Settings, SettingsError, add_flags, load

log = logging.getLogger("chatserver")


def _serve(args: argparse.Namespace) -> int:
    settings = load(args)
    settings.check_dev_auth()  # refused before anything starts (exit 2)
    logs.configure(settings.server.log_level, settings.server.server_id)
    log.info("settings", extra={"settings": settings.public_dict()})
    loop_factory: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux/macOS
        pass
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(_run_server(settings))
    return 0


async def _run_server(settings: Settings) -> None:
    from .app import create_app
    from .ops.drain import drain

    app = create_app(settings)
    runner = web.AppRunner(
        app,
        # aiohttp arms this at connection start and re-arms it between requests: a socket
        # that sends nothing, or stops mid-request, is closed after it (its default: 1 h).
        keepalive_timeout=settings.server.http_idle_timeout_s,
        access_log=logging.getLogger("aiohttp.access"),
        access_log_class=JsonAccessLogger,
        shutdown_timeout=settings.server.shutdown_grace_s + 5,
        handle_signals=False,
    )
    await runner.setup()
    site = web.TCPSite(runner, settings.server.host, settings.server.port)
    await site.start()
    # Everything alive now (modules, the app, pools) lives as long as the process: out of
    # the collector's sight, or each full collection walks it again (~60 ms pauses at 500
    # connections, in the fan-out p99).
    gc.freeze()
    # Full collections after 1,000 middle-generation ones, not 10: each walks all the run
    # made live (connections, windows, the outbox), a pause of ~300 ms at 1,000 streamed
    # replies. At 100 they still came every ~10 s there (~3% of the CPU per reply, and the
    # worst gaps between deltas); at 1,000 about every 2 minutes. The young generations are
    # collected as before, so only cycles that outlived them wait longer; garbage without
    # cycles is freed by reference counting as always.
    gc.set_threshold(700, 10, 1000)
    host, port = runner.addresses[0][:2]
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    url = f"http://{shown}:{port}/"
    logs.announce(f"chatserver listening on {url}", url=url)  # stdout, as JSON
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    log.info("stopping: draining connections and flushing the outbox")
    # Drain while still listening: /readyz says 503 and the load balancer moves away.
    await drain(app)
    await runner.cleanup()
    log.info("stopped")


def _token(args: argparse.Namespace) -> int:
    # The same settings as the server's, by the same rules: the secret, aud, iss, lifetime.
    settings = load({})
    if settings.auth.secret is None:
        print("chatserver token: CHAT_JWT_SECRET is not set", file=sys.stderr)
        return 2
    if args.ttl > settings.auth.max_lifetime_s:
        print(
            f"chatserver token: --ttl {args.ttl} is over CHAT_JWT_MAX_LIFETIME_S "
            f"({settings.auth.max_lifetime_s}): the server would refuse the token",
            file=sys.stderr,
        )
        return 2
    try:
        print(authenticator(settings).issue(args.user, args.tier, args.role, args.ttl))
    except AuthError as exc:
        print(f"chatserver token: {exc}", file=sys.stderr)
        return 2
    return 0


def _postgres_settings(args: argparse.Namespace, command: str) -> Settings:
    settings = load({"database_url": args.database_url})
    if settings.store.url is None:
        raise SettingsError(f"{command} needs --database-url or CHAT_DATABASE_URL")
    return settings


async def _maintain(settings: Settings, migrate: bool, retain_months: int | None) -> None:
    from storage.store.postgres import PostgresStore

    assert settings.store.url is not None
    store = PostgresStore(
        settings.store.url,
        pool_min=1,
        pool_max=1,
        command_timeout_s=max(settings.store.command_timeout_s, 300.0),  # DDL may wait on locks
        pgbouncer=settings.store.pgbouncer,
        migrate=migrate,
        months_ahead=settings.store.partition_months_ahead,
    )
    await store.start()  # migrates when asked, checks the schema, creates partitions ahead
    try:
        if migrate:
            print(f"migrations applied: {store.applied_migrations or 'none (up to date)'}")
        created = store.start_partitions.created if store.start_partitions else []
        print(
            f"partitions: {settings.store.partition_months_ahead} months ahead; created {created}"
        )
        if retain_months is not None:
            dropped = await store.drop_old_partitions(retain_months)
            print(
                f"retention {retain_months} months: dropped {dropped.dropped}, "
                f"{dropped.deleted_from_default} old rows of the default partition"
            )
    finally:
        await store.close()


def _run_maintenance(args: argparse.Namespace, migrate: bool, retain: int | None) -> int:
    from storage.store.base import StoreUnavailable
    from storage.store.pg_migrate import SchemaError

    settings = _postgres_settings(args, args.command)
    logs.configure(settings.server.log_level, settings.server.server_id)
    try:
        asyncio.run(_maintain(settings, migrate, retain))
    except (StoreUnavailable, SchemaError, ValueError) as exc:
        print(f"chatserver {args.command}: {exc}", file=sys.stderr)
        return 1
    return 0


def _migrate(args: argparse.Namespace) -> int:
    return _run_maintenance(args, migrate=True, retain=None)


def _partitions(args: argparse.Namespace) -> int:
    if args.retain_months is not None and args.retain_months < 1:
        print("chatserver partitions: --retain-months must be at least 1", file=sys.stderr)
        return 2
    return _run_maintenance(args, migrate=False, retain=args.retain_months)


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
    migrate = commands.add_parser(
        "migrate", help="apply the Postgres migrations and create the partitions ahead"
    )
    migrate.add_argument("--database-url", help="Postgres URL [CHAT_DATABASE_URL]")
    migrate.set_defaults(func=_migrate)
    partitions = commands.add_parser(
        "partitions",
        help="create the monthly message partitions ahead; drop those past --retain-months",
    )
    partitions.add_argument("--database-url", help="Postgres URL [CHAT_DATABASE_URL]")
    partitions.add_argument(
        "--retain-months",
        type=int,
        help="drop the partitions entirely older than this many full months before this one",
    )
    partitions.set_defaults(func=_partitions)
    from chatload.cli import add_parser as add_loadtest

    add_loadtest(commands)
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
