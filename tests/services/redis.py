"""A throwaway ``redis-server``, and a three-master Redis Cluster, for the tests."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
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
    start_on_a_free_port,
)


def find_redis_server() -> str:
    found = installed("redis-server", "/usr/bin/redis-server")
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
        self.extra_args: list[str] = []  # more settings, from the next start on
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
        start_on_a_free_port(self, self._spawn)

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
        argv += self.extra_args
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
