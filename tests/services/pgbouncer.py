"""A throwaway PgBouncer in front of a test Postgres."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from .base import (
    _START_ATTEMPTS,
    START_TIMEOUT_S,
    STOP_TIMEOUT_S,
    ServiceError,
    _die_with_parent,
    _tail,
    _temp_base,
    free_port,
    installed,
)
from .postgres import PostgresServer


def find_pgbouncer() -> str:
    found = installed("pgbouncer", "/usr/sbin/pgbouncer")
    if found is None:
        raise ServiceError(
            "pgbouncer is not installed: run `make deps` or `apt-get install pgbouncer`"
        )
    return found


class PgBouncer:
    """PgBouncer in transaction pooling mode in front of ``server``, for every database.

    ``pool_size`` server connections per database: fewer than the clients', so consecutive
    transactions of one client do land on different server connections.
    """

    host = "127.0.0.1"

    def __init__(self, server: PostgresServer, *, pool_size: int = 3) -> None:
        self.binary = find_pgbouncer()
        self.server = server
        self.pool_size = pool_size
        self.dir = Path(tempfile.mkdtemp(prefix="chatserver-pgbouncer-", dir=_temp_base()))
        self._owner: pwd.struct_passwd | None = None
        if os.geteuid() == 0:  # pgbouncer refuses to run as root
            self._owner = pwd.getpwnam("postgres")
            os.chown(self.dir, self._owner.pw_uid, self._owner.pw_gid)
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.dir / "pgbouncer.log"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def dsn_for(self, database: str) -> str:
        return f"postgresql://{self.server.user}@{self.host}:{self.port}/{database}"

    def _write_config(self) -> Path:
        (self.dir / "userlist.txt").write_text(f'"{self.server.user}" ""\n')
        ini = self.dir / "pgbouncer.ini"
        ini.write_text(
            "[databases]\n"
            f"* = host={self.server.host} port={self.server.port}\n"
            "[pgbouncer]\n"
            f"listen_addr = {self.host}\n"
            f"listen_port = {self.port}\n"
            "unix_socket_dir =\n"
            "auth_type = trust\n"
            f"auth_file = {self.dir / 'userlist.txt'}\n"
            "pool_mode = transaction\n"
            f"default_pool_size = {self.pool_size}\n"
            "max_client_conn = 1000\n"
            "server_login_retry = 1\n"
            "ignore_startup_parameters = extra_float_digits\n"
            f"logfile = {self.log_path}\n"
        )
        if self._owner is not None:
            for path in self.dir.iterdir():
                os.chown(path, self._owner.pw_uid, self._owner.pw_gid)
        return ini

    def start(self) -> None:
        if self.running:
            return
        last: ServiceError | None = None
        for _ in range(_START_ATTEMPTS):
            if not self.port or last is not None:
                self.port = free_port()
            try:
                self._spawn()
                return
            except ServiceError as exc:
                last = exc
        raise last or ServiceError("pgbouncer did not start")

    def _spawn(self) -> None:
        ini = self._write_config()
        owner = self._owner
        self._proc = subprocess.Popen(
            [self.binary, str(ini)],
            cwd=self.dir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            user=owner.pw_uid if owner else None,
            group=owner.pw_gid if owner else None,
            preexec_fn=_die_with_parent,
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self._proc.poll() is not None:
                self._proc = None
                raise ServiceError(f"pgbouncer exited at start:\n{_tail(self.log_path)}")
            try:
                with socket.create_connection((self.host, self.port), timeout=1.0):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise ServiceError(f"pgbouncer did not listen on {self.port} in time")
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=0.02)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
