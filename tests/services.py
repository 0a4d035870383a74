"""Throwaway Redis and Postgres servers for the tests.

Each server lives in its own temporary directory on a free port of 127.0.0.1 and never touches
the machine's own databases. Readiness is polled with a deadline; nothing sleeps to synchronise.
When the tests run as root, the Postgres tools run as the ``postgres`` user through ``runuser``
(``initdb`` and ``pg_ctl`` refuse to run as root).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
_START_ATTEMPTS = 5  # a free port can be taken by someone else before the server binds it
_PG_ROOT = "/usr/lib/postgresql"
_DB_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


class ServiceError(RuntimeError):
    """A test service is missing or did not start; the message says what to do."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def _temp_base() -> str:
    """A temp root that the ``postgres`` user can traverse when we are root."""
    base = tempfile.gettempdir()
    if os.geteuid() != 0:
        return base
    path = Path(base).resolve()
    for part in (path, *path.parents):
        if not part.stat().st_mode & stat.S_IXOTH:
            return "/tmp"
    return base


def _die_with_parent() -> None:
    """In the child before exec: get SIGKILL when the test process dies (Linux only)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG


# --------------------------------------------------------------------------------------------
# Redis


def find_redis_server() -> str:
    found = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.access("/usr/bin/redis-server", os.X_OK) else None
    )
    if found is None:
        raise ServiceError(
            "redis-server is not installed (binary 'redis-server' not found on PATH or in "
            "/usr/bin): run `make deps` or `apt-get install redis-server`"
        )
    return found


def _resp(*args: str) -> bytes:
    out = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        raw = arg.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(out)


def redis_command(port: int, *args: str, timeout: float = 5.0) -> bytes:
    """One command over a fresh connection; the reply's value (``PING`` -> ``b"PONG"``).

    Understands simple, integer and bulk string replies; an error reply raises ServiceError.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(_resp(*args))
        buf = b""
        while b"\r\n" not in buf:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("redis closed the connection")
            buf += chunk
        head, _, rest = buf.partition(b"\r\n")
        if head[:1] == b"-":
            raise ServiceError(f"redis {args[0]} failed: {head[1:].decode(errors='replace')}")
        if head[:1] != b"$" or head == b"$-1":
            return head[1:]
        size = int(head[1:])
        while len(rest) < size + 2:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("redis closed the connection")
            rest += chunk
        return rest[:size]


class RedisServer:
    """A ``redis-server`` subprocess on 127.0.0.1 without persistence.

    ``stop()`` and ``start()`` restart it on the same port (the data is gone: nothing is saved).
    """

    host = "127.0.0.1"

    def __init__(
        self, binary: str | None = None, *, appendonly: bool = False, unix_socket: bool = False
    ) -> None:
        self.binary = binary or find_redis_server()
        self.appendonly = appendonly  # AOF with fsync always: a restart keeps every write
        self.unix_socket = unix_socket  # also listen on ``socket_path``
        self.dir = Path(tempfile.mkdtemp(prefix="chatserver-redis-", dir=_temp_base()))
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return self.url_for(0)

    def url_for(self, db: int) -> str:
        return f"redis://{self.host}:{self.port}/{db}"

    @property
    def log_path(self) -> Path:
        return self.dir / "redis.log"

    @property
    def socket_path(self) -> Path:
        return self.dir / "redis.sock"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start the server: on a free port the first time, on the same port afterwards."""
        if self.running:
            return
        if self.port:
            self._spawn()
            return
        last: ServiceError | None = None
        for _ in range(_START_ATTEMPTS):
            self.port = free_port()
            try:
                self._spawn()
                return
            except ServiceError as exc:
                last = exc
        self.port = 0
        assert last is not None
        raise last

    def _spawn(self) -> None:
        argv = [
            self.binary,
            "--port", str(self.port),
            "--bind", self.host,
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "always",
            "--dir", str(self.dir),
            "--daemonize", "no",
            "--logfile", str(self.log_path),
        ]  # fmt: skip
        if self.unix_socket:
            argv += ["--unixsocket", str(self.socket_path), "--unixsocketperm", "700"]
        self._proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self._proc.poll() is not None:
                self._proc = None
                raise ServiceError(
                    f"redis-server exited at start on port {self.port}:\n{_tail(self.log_path)}"
                )
            try:
                # a PONG from *our* process: someone else may have taken the port meanwhile
                info = redis_command(self.port, "INFO", "server", timeout=1.0)
                if f"process_id:{self._proc.pid}\r\n".encode() in info:
                    return
            except (OSError, ServiceError):  # not listening yet, or still loading
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise ServiceError(
                    f"redis-server did not answer on port {self.port} within {START_TIMEOUT_S}s"
                )
            # wait on the process, not on a timer: returns at once if it dies
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=0.02)

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL past the timeout); the port stays reserved."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def kill(self) -> None:
        """Crash the server (SIGKILL), as a fault would."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def flushall(self) -> None:
        reply = redis_command(self.port, "FLUSHALL")
        if reply != b"OK":
            raise ServiceError(f"FLUSHALL answered {reply!r}")

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Postgres


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
        last: ServiceError | None = None
        for _ in range(_START_ATTEMPTS):
            self.port = free_port()
            try:
                self._pg_ctl_start()
                return
            except ServiceError as exc:
                last = exc
        self.port = 0
        assert last is not None
        raise last

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


class RedisClusterServer:
    """Three ``redis-server --cluster-enabled yes`` masters, joined by ``redis-cli --cluster``.

    ``.url`` names the first node (a cluster client discovers the others), ``.nodes`` lists
    ``(host, port)`` of all three; ``flushall()`` empties every node.
    """

    host = "127.0.0.1"
    size = 3

    def __init__(self, binary: str | None = None, *, appendonly: bool = False) -> None:
        self.binary = binary or find_redis_server()
        self.appendonly = appendonly  # AOF (fsync always): restart() keeps every write
        self._argvs: list[list[str]] = []
        cli = shutil.which("redis-cli") or str(Path(self.binary).with_name("redis-cli"))
        if not os.access(cli, os.X_OK):
            raise ServiceError("redis-cli is not installed (Debian package redis-tools)")
        self.cli = cli
        self.dir = Path(tempfile.mkdtemp(prefix="chatserver-rcluster-", dir=_temp_base()))
        self.ports: list[int] = []
        self._procs: list[subprocess.Popen[bytes]] = []

    @property
    def nodes(self) -> list[tuple[str, int]]:
        return [(self.host, port) for port in self.ports]

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.ports[0]}"

    def _free_ports(self) -> list[int]:
        """Ports P whose cluster bus port P + 10000 is free as well."""
        ports: list[int] = []
        while len(ports) < self.size:
            port = free_port()
            if port + 10000 > 65535 or port in ports:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                try:
                    sock.bind((self.host, port + 10000))
                except OSError:
                    continue
            ports.append(port)
        return ports

    def start(self) -> None:
        if self._procs:
            return
        last: ServiceError | None = None
        for _ in range(_START_ATTEMPTS):
            try:
                self._start_once()
                return
            except ServiceError as exc:
                last = exc
                self.stop()
        assert last is not None
        raise last

    def _start_once(self) -> None:
        self.ports = self._free_ports()
        for port in self.ports:
            node_dir = self.dir / str(port)
            node_dir.mkdir(parents=True, exist_ok=True)
            argv = [
                self.binary,
                "--port", str(port),
                "--bind", self.host,
                "--cluster-enabled", "yes",
                "--cluster-config-file", str(node_dir / "nodes.conf"),
                "--cluster-node-timeout", "5000",
                "--save", "",
                "--appendonly", "yes" if self.appendonly else "no",
                "--appendfsync", "always",
                "--dir", str(node_dir),
                "--daemonize", "no",
                "--logfile", str(node_dir / "redis.log"),
            ]  # fmt: skip
            self._argvs.append(argv)
            self._procs.append(self._spawn(argv))
        for port, proc in zip(self.ports, self._procs, strict=True):
            self._wait(
                lambda p=port, pid=proc.pid: (
                    f"process_id:{pid}\r\n".encode()
                    in redis_command(p, "INFO", "server", timeout=1.0)
                ),
                f"node {port}",
            )
        create = subprocess.run(
            [self.cli, "--cluster", "create", *(f"{h}:{p}" for h, p in self.nodes),
             "--cluster-replicas", "0", "--cluster-yes"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT_S,
            check=False,
        )  # fmt: skip
        if create.returncode != 0:
            raise ServiceError(f"redis-cli --cluster create failed: {create.stdout}{create.stderr}")
        for port in self.ports:
            self._wait(
                lambda p=port: b"cluster_state:ok" in redis_command(p, "CLUSTER", "INFO"),
                f"cluster_state:ok on node {port}",
            )

    @staticmethod
    def _spawn(argv: list[str]) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )

    def restart(self) -> None:
        """Stop every node (SIGTERM) and start it again on its port, config and AOF."""
        procs, self._procs = self._procs, []
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait(timeout=STOP_TIMEOUT_S)
        self._procs = [self._spawn(argv) for argv in self._argvs]
        for port in self.ports:
            self._wait(
                lambda p=port: b"cluster_state:ok" in redis_command(p, "CLUSTER", "INFO"),
                f"cluster_state:ok on node {port} after the restart",
            )

    def _wait(self, ready: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            for proc in self._procs:
                if proc.poll() is not None:
                    raise ServiceError(f"a cluster node exited at start:\n{self._logs()}")
            try:
                if ready():
                    return
            except (OSError, ServiceError):
                pass
            if time.monotonic() > deadline:
                raise ServiceError(f"no {what} within {START_TIMEOUT_S}s:\n{self._logs()}")
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._procs[0].wait(timeout=0.05)

    def _logs(self) -> str:
        return "\n".join(_tail(self.dir / str(port) / "redis.log", 10) for port in self.ports)

    def flushall(self) -> None:
        for port in self.ports:
            reply = redis_command(port, "FLUSHALL")
            if reply != b"OK":
                raise ServiceError(f"FLUSHALL on node {port} answered {reply!r}")

    def stop(self) -> None:
        procs, self._procs = self._procs, []
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        # The node configs name the old ports: a start after stop builds a new cluster.
        self._argvs = []
        for port in self.ports:
            shutil.rmtree(self.dir / str(port), ignore_errors=True)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Postgres streaming replica and PgBouncer (issue 4)


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


def find_pgbouncer() -> str:
    found = shutil.which("pgbouncer") or (
        "/usr/sbin/pgbouncer" if os.access("/usr/sbin/pgbouncer", os.X_OK) else None
    )
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
