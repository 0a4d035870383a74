"""A real ``chatserver serve`` process for system tests.

    with ServerProc(tmp_path, env={"CHAT_LOCAL_TOKEN_MS": "5"}) as server:
        server.url    # "http://127.0.0.1:PORT"
        server.port
        server.proc   # the subprocess.Popen
        server.output # what the process printed so far (stdout and stderr)

The server listens on a free port of 127.0.0.1 picked here (``--port 0`` would bind a random
port but print the configured one), stores into a SQLite file under the given directory, and
is ready when ``GET /healthz`` answers 200: polled with a deadline, never a fixed sleep.
``stop()`` sends SIGTERM and waits (SIGKILL after a timeout); ``start()`` after ``stop()``
starts it again on the same port and the same file, as a restarted instance would. Inherited
``CHAT_*`` variables are dropped so that only what the test passes configures the server.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

from .services.base import free_port

REPO_ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 20.0
_START_ATTEMPTS = 3  # a free port can be taken by someone else before the server binds it


class ServerProcError(RuntimeError):
    """The server did not start or stop as expected; the message carries its output."""


class ServerProc:
    def __init__(
        self,
        workdir: str | os.PathLike[str] | None = None,
        *,
        env: Mapping[str, str] | None = None,
        args: Sequence[str] = (),
        port: int | None = None,
        sqlite_path: str | os.PathLike[str] | None = None,
        start_timeout_s: float = START_TIMEOUT_S,
    ) -> None:
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="chatserver-")
            workdir = self._tmp.name
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.sqlite_path = Path(sqlite_path) if sqlite_path else self.workdir / "chat.sqlite3"
        self.env = dict(env or {})
        self.args = list(args)
        self._fixed_port = port is not None
        self.port = port if port is not None else free_port()
        self.start_timeout_s = start_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.workdir / "server.log"
        self._log_offset = 0  # where the current run's output starts in the log

    # -- properties -------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def output(self) -> str:
        """Everything every run of the server printed so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "chatserver",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--sqlite-path",
            str(self.sqlite_path),
            *self.args,
        ]

    def _environ(self) -> dict[str, str]:
        # Only what the test passes configures the server; a developer's model key never
        # reaches it (the server would otherwise call Google).
        environ = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("CHAT_") and k not in ("GEMINI_API_KEY", "GOOGLE_API_KEY")
        }
        environ["PYTHONUNBUFFERED"] = "1"
        environ.update(self.env)
        return environ

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> ServerProc:
        """Start (or restart) the server and wait until /healthz answers."""
        if self.running:
            raise ServerProcError(f"server already running on port {self.port}")
        keep_port = self._fixed_port or self.proc is not None  # a restart keeps its address
        last_error: ServerProcError | None = None
        for _ in range(_START_ATTEMPTS):
            try:
                self._spawn_and_wait()
                return self
            except ServerProcError as exc:
                last_error = exc
                if keep_port or "address already in use" not in self._run_output().lower():
                    raise
                self.port = free_port()  # someone took our port between the pick and the bind
        assert last_error is not None
        raise last_error

    def _run_output(self) -> str:
        return self.output[self._log_offset :]

    def _spawn_and_wait(self) -> None:
        self._log_offset = len(self.output)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.command(),
                cwd=REPO_ROOT,
                env=self._environ(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            code = self.proc.poll()
            if code is not None:
                raise ServerProcError(
                    f"chatserver exited with {code} before it was ready:\n"
                    f"{self._run_output()[-4000:]}"
                )
            if self._healthy():
                return
            if time.monotonic() > deadline:
                self.kill()
                raise ServerProcError(
                    f"chatserver not ready within {self.start_timeout_s:.0f} s "
                    f"on port {self.port}:\n"
                    f"{self._run_output()[-4000:]}"
                )
            time.sleep(0.05)

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/healthz", timeout=1.0) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM, then wait; SIGKILL if it does not exit in time. Returns the exit code."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    def kill(self) -> None:
        """SIGKILL: an instance that dies without cleaning up."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def restart(self) -> ServerProc:
        """Stop gracefully, then start again on the same port and store."""
        self.stop()
        return self.start()

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            with contextlib.suppress(OSError):
                self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> ServerProc:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
