"""Debian's nginx running ``deploy/nginx.conf`` in front of test instances.

    with NginxProc(["127.0.0.1:8101", "127.0.0.1:8102"]) as lb:
        lb.url, lb.ws_url, lb.port
        lb.access_log()   # parsed lines of its access log

The configuration is ``deploy/nginx.conf`` as is, but for what must differ in a test: the pid
file, the logs and the temp directories go into a private prefix, and it listens on a free port
of 127.0.0.1 instead of port 80. Each of those substitutions must match exactly once, so a change
to the file that the test would silently step around fails here instead. ``upstreams.conf`` is
written beside it from ``deploy/nginx/upstreams.conf.example``: its server parameters (the
passive health check), the test's addresses. nginx runs in the foreground (``daemon off``) with
its master process, as root when the tests run as root (workers then run as ``nobody``); it is
ready when a request through it reaches an instance. ``stop()`` is nginx's fast shutdown.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from tests.serverproc import REPO_ROOT, free_port
from tests.services import _die_with_parent, _temp_base, installed

NGINX_CONF = REPO_ROOT / "deploy" / "nginx.conf"
UPSTREAMS_EXAMPLE = REPO_ROOT / "deploy" / "nginx" / "upstreams.conf.example"
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 15.0


class NginxError(RuntimeError):
    """nginx is missing, its configuration is not what the test expects, or it did not start."""


def find_nginx() -> str:
    found = installed("nginx", "/usr/sbin/nginx")
    if found is None:
        raise NginxError(
            "nginx is not installed (no 'nginx' on PATH or in /usr/sbin): run `make deps` "
            "or `apt-get install nginx`"
        )
    return found


def _substitute(text: str, pattern: str, replacement: str) -> str:
    new, count = re.subn(pattern, lambda _m: replacement, text, flags=re.MULTILINE)
    if count != 1:
        raise NginxError(
            f"deploy/nginx.conf: expected exactly one match of {pattern!r}, got {count}"
        )
    return new


def render_config(prefix: Path, port: int) -> str:
    """deploy/nginx.conf with the test's paths and listen address."""
    text = NGINX_CONF.read_text()
    temp = prefix / "temp"
    text = _substitute(text, r"^pid\s+\S+;", f"pid {prefix / 'nginx.pid'};")
    text = _substitute(text, r"^error_log\s+\S+", f"error_log {prefix / 'logs' / 'error.log'}")
    text = _substitute(
        text, r"^[ \t]*access_log\s+\S+", f"    access_log {prefix / 'logs' / 'access.log'}"
    )
    text = _substitute(text, r"^[ \t]*listen\s+80;", f"        listen 127.0.0.1:{port};")
    temp_paths = "".join(
        f"    {kind}_temp_path {temp / kind};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return _substitute(text, r"^http \{\n", "http {\n" + temp_paths)


def render_upstreams(addresses: Sequence[str]) -> str:
    """One server line per address, with the example's parameters."""
    examples = [
        line.split()
        for line in UPSTREAMS_EXAMPLE.read_text().splitlines()
        if line.strip().startswith("server ")
    ]
    if not examples:
        raise NginxError(f"{UPSTREAMS_EXAMPLE}: no `server` line")
    params = " ".join(examples[0][2:]).rstrip(";")
    return "".join(f"server {address} {params};\n" for address in addresses)


@dataclass(frozen=True)
class AccessLine:
    request: str
    status: int
    upstream: str
    upstream_status: str
    raw: str


_LINE = re.compile(
    r'"(?P<request>[^"]*)" (?P<status>\d{3}) .* upstream="(?P<upstream>[^"]*)" '
    r'ustatus="(?P<ustatus>[^"]*)"'
)


class NginxProc:
    def __init__(self, upstreams: Sequence[str]) -> None:
        self.binary = find_nginx()
        self.upstreams = list(upstreams)
        # Workers run as nobody: every directory above the temp paths must be traversable.
        self.prefix = Path(tempfile.mkdtemp(prefix="chatserver-nginx-", dir=_temp_base()))
        self.prefix.chmod(0o755)
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def conf_path(self) -> Path:
        return self.prefix / "conf" / "nginx.conf"

    @property
    def error_log(self) -> Path:
        return self.prefix / "logs" / "error.log"

    def _write(self) -> None:
        for sub in ("conf", "logs", "temp"):
            (self.prefix / sub).mkdir(exist_ok=True)
        self.conf_path.write_text(render_config(self.prefix, self.port))
        (self.prefix / "conf" / "upstreams.conf").write_text(render_upstreams(self.upstreams))

    def _argv(self, *extra: str) -> list[str]:
        return [
            self.binary,
            "-p",
            f"{self.prefix}/",
            "-c",
            str(self.conf_path),
            "-e",
            str(self.error_log),
            *extra,
        ]

    def start(self) -> NginxProc:
        last = ""
        for _ in range(3):  # the free port can be taken before nginx binds it
            self.port = free_port()
            self._write()
            check = subprocess.run(self._argv("-t"), capture_output=True, text=True, timeout=30)
            if check.returncode != 0:
                raise NginxError(f"nginx -t failed:\n{check.stdout}{check.stderr}")
            self.proc = subprocess.Popen(
                self._argv("-g", "daemon off; master_process on;"),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                preexec_fn=_die_with_parent,
            )
            deadline = time.monotonic() + START_TIMEOUT_S
            while self.proc.poll() is None and time.monotonic() < deadline:
                if self._ready():
                    return self
                time.sleep(0.05)
            last = self._tail()
            self.stop()
            if "Address already in use" not in last:
                break
        raise NginxError(f"nginx did not start on 127.0.0.1:{self.port}:\n{last}")

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/healthz", timeout=1.0) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    def _tail(self) -> str:
        try:
            return "\n".join(self.error_log.read_text(errors="replace").splitlines()[-30:])
        except OSError:
            return "(no error log)"

    def access_log(self) -> list[AccessLine]:
        try:
            text = (self.prefix / "logs" / "access.log").read_text(errors="replace")
        except OSError:
            return []
        lines = []
        for raw in text.splitlines():
            match = _LINE.search(raw)
            if match is None:
                raise NginxError(f"access log line not in the `chat` format: {raw!r}")
            lines.append(
                AccessLine(
                    match["request"],
                    int(match["status"]),
                    match["upstream"],
                    match["ustatus"],
                    raw,
                )
            )
        return lines

    def stop(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)  # fast shutdown: open WebSockets are not waited for
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def close(self) -> None:
        self.stop()
        with contextlib.suppress(OSError):
            shutil.rmtree(self.prefix)

    def __enter__(self) -> NginxProc:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
