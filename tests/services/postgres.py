"""A throwaway Postgres cluster (``initdb`` in a temp dir) and a streaming replica of it.

When the tests run as root, the Postgres tools run as the ``postgres`` user through ``runuser``
(``initdb`` and ``pg_ctl`` refuse to run as root).
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from .base import (
    START_TIMEOUT_S,
    STOP_TIMEOUT_S,
    ServiceError,
    _tail,
    _temp_base,
    start_on_a_free_port,
)

_PG_ROOT = "/usr/lib/postgresql"
_DB_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


def _version_key(path: str) -> tuple[int, ...]:
    name = Path(path).parent.parent.name  # /usr/lib/postgresql/<ver>/bin/initdb
    return tuple(int(p) for p in re.findall(r"\d+", name)) or (0,)


def find_postgres_bindir() -> Path:
    """The bin directory of the newest installed Postgres (``CHATSERVER_PG_BIN`` overrides)."""
    override = os.environ.get("CHATSERVER_PG_BIN")
    if override:
        candidates = [str(Path(override) / "initdb")]
    else:
        candidates = sorted(glob.glob(f"{_PG_ROOT}/*/bin/initdb"), key=_version_key)
    for initdb in reversed(candidates):
        bindir = Path(initdb).parent
        if all(os.access(bindir / tool, os.X_OK) for tool in ("initdb", "pg_ctl", "postgres")):
            return bindir
    where = f"{override} (CHATSERVER_PG_BIN)" if override else f"{_PG_ROOT}/*/bin"
    raise ServiceError(
        f"Postgres server is not installed (binary 'initdb' not found under {where}): "
        "run `make deps` or `apt-get install postgresql`"
    )


class PostgresServer:
    """A throwaway Postgres cluster (``initdb`` in a temp dir) on 127.0.0.1.

    Trust authentication for the superuser ``postgres``; the unix socket lives in the temp dir.
    """

    host = "127.0.0.1"
    user = "postgres"

    def __init__(
        self, bindir: Path | None = None, *, settings: dict[str, str] | None = None
    ) -> None:
        self.bindir = bindir or find_postgres_bindir()
        self.settings = dict(settings or {})  # extra `-c name=value`, after (over) the defaults
        self._file_copy: bool | None = None  # CREATE DATABASE ... STRATEGY FILE_COPY (15+)
        self._as_user: list[str] = []
        owner: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            try:
                owner = pwd.getpwnam("postgres")
            except KeyError:
                raise ServiceError(
                    "running as root, but there is no 'postgres' user to run initdb/pg_ctl as: "
                    "install the Debian 'postgresql' package (it creates the user)"
                ) from None
            runuser = shutil.which("runuser") or "/usr/sbin/runuser"
            self._as_user = [runuser, "-u", "postgres", "--"]
        self.dir = Path(tempfile.mkdtemp(prefix="chatserver-pg-", dir=_temp_base()))
        if owner is not None:
            os.chown(self.dir, owner.pw_uid, owner.pw_gid)
        self.data_dir = self.dir / "data"
        self.port = 0
        self.running = False
        try:
            self._initdb()
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise

    # -- process control -----------------------------------------------------------------

    def _run(self, argv: Sequence[str], *, timeout: float = START_TIMEOUT_S) -> None:
        proc = subprocess.run(
            [*self._as_user, *argv],
            cwd=self.dir,  # root's working directory may be unreadable for 'postgres'
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if proc.returncode != 0:
            raise ServiceError(
                f"{Path(argv[0]).name} failed ({proc.returncode}): {proc.stdout}{proc.stderr}\n"
                f"server log:\n{_tail(self.log_path)}"
            )

    @property
    def log_path(self) -> Path:
        return self.dir / "postgres.log"

    def _initdb(self) -> None:
        self._run(
            [
                str(self.bindir / "initdb"),
                "-D", str(self.data_dir),
                "-U", self.user,
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
                "--no-instructions",
            ]
        )  # fmt: skip

    def start(self) -> None:
        """Start the cluster: on a free port the first time, on the same port afterwards."""
        if self.running:
            return
        if self.port:
            self._pg_ctl_start()
            return
        start_on_a_free_port(self, self._pg_ctl_start)

    def _pg_ctl_start(self) -> None:
        options = " ".join(
            [
                f"-p {self.port}",
                f"-k {shlex.quote(str(self.dir))}",
                "-c listen_addresses=127.0.0.1",
                "-c fsync=off",
                # synchronous_commit stays on: with fsync=off a commit costs one write(), and
                # 'off' would let `stop -m immediate` lose acknowledged commits in fault tests
                "-c full_page_writes=off",
                "-c max_connections=200",
                "-c timezone=UTC",
                *(f"-c {name}={value}" for name, value in self.settings.items()),
            ]
        )
        self._run(
            [
                str(self.bindir / "pg_ctl"),
                "start",
                "-D", str(self.data_dir),
                "-l", str(self.log_path),
                "-w",
                "-t", str(int(START_TIMEOUT_S)),
                "-o", options,
            ],
            timeout=START_TIMEOUT_S + 10,
        )  # fmt: skip
        self.running = True

    def stop(self, mode: str = "immediate") -> None:
        """``pg_ctl stop -m MODE`` (immediate by default: like a crash, recovery at start)."""
        if not self.data_dir.joinpath("postmaster.pid").exists():
            self.running = False
            return
        self._run(
            [str(self.bindir / "pg_ctl"), "stop", "-D", str(self.data_dir), "-m", mode, "-w"],
            timeout=STOP_TIMEOUT_S + 10,
        )
        self.running = False

    def close(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    # -- databases -----------------------------------------------------------------------

    @property
    def dsn(self) -> str:
        return self.dsn_for("postgres")

    def dsn_for(self, database: str) -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{database}"

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run SQL through ``psql`` over TCP; return its unaligned output."""
        psql = self.bindir / "psql"
        if not os.access(psql, os.X_OK):
            found = shutil.which("psql")
            if found is None:
                raise ServiceError("psql is not installed (Debian package postgresql-client)")
            psql = Path(found)
        proc = subprocess.run(
            [
                str(psql), "-X", "-q", "-A", "-t",
                "-v", "ON_ERROR_STOP=1",
                "-h", self.host, "-p", str(self.port), "-U", self.user, "-d", database,
                "-c", sql,
            ],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT_S,
            check=False,
            env={**os.environ, "PGCONNECT_TIMEOUT": "10"},
        )  # fmt: skip
        if proc.returncode != 0:
            raise ServiceError(f"psql failed on {sql!r}: {proc.stderr.strip()}")
        return proc.stdout

    def create_database(self, name: str) -> str:
        """``CREATE DATABASE name``; returns its DSN."""
        if not _DB_NAME.fullmatch(name):
            raise ValueError(f"database name {name!r} must match {_DB_NAME.pattern}")
        # FILE_COPY: from Postgres 15 the default (WAL_LOG) writes the whole template to the
        # WAL, ~150 ms against ~50 ms here, and most tests on Postgres make a database of
        # their own. Older servers only copy files (and know no STRATEGY).
        if self._file_copy is None:
            self._file_copy = int(self.psql("SHOW server_version_num").strip()) >= 150000
        strategy = " STRATEGY FILE_COPY" if self._file_copy else ""
        self.psql(f'CREATE DATABASE "{name}"{strategy}')
        return self.dsn_for(name)

    def drop_database(self, name: str) -> None:
        """``DROP DATABASE IF EXISTS name WITH (FORCE)``: open connections are terminated."""
        if not _DB_NAME.fullmatch(name):
            raise ValueError(f"database name {name!r} must match {_DB_NAME.pattern}")
        self.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class PostgresReplica(PostgresServer):
    """A hot-standby streaming replica of ``primary``: ``pg_basebackup -R``, a second postmaster.

    ``dsn_for(name)`` names the primary's databases on the replica (read-only).
    ``wait_caught_up()`` returns once it replayed all the primary wrote so far;
    ``pause_replay()`` / ``resume_replay()`` freeze and thaw what it shows.
    """

    def __init__(self, primary: PostgresServer) -> None:
        self.primary = primary
        super().__init__(primary.bindir)

    def _initdb(self) -> None:  # the data directory is a base backup of the primary
        self._run(
            [
                str(self.bindir / "pg_basebackup"),
                "-h", self.primary.host,
                "-p", str(self.primary.port),
                "-U", self.primary.user,
                "-D", str(self.data_dir),
                "-R",  # standby.signal + primary_conninfo: start as a streaming standby
                "-X", "stream",
                "-c", "fast",
                "--no-sync",
            ]
        )  # fmt: skip

    def wait_caught_up(self, timeout: float = START_TIMEOUT_S) -> None:
        target = self.primary.psql("SELECT pg_current_wal_lsn()").strip()
        deadline = time.monotonic() + timeout
        while self.psql(f"SELECT pg_last_wal_replay_lsn() >= '{target}'::pg_lsn").strip() != "t":
            if time.monotonic() > deadline:
                raise ServiceError(f"replica did not replay up to {target} within {timeout}s")
            time.sleep(0.02)

    def pause_replay(self) -> None:
        self.psql("SELECT pg_wal_replay_pause()")

    def resume_replay(self) -> None:
        self.psql("SELECT pg_wal_replay_resume()")
