"""Installing chatserver: the lock on every supported Python, and Debian 12's own Python.

- requirements.lock holds every runtime dependency, with a wheel, for CPython 3.11.0 through
  3.13 on Linux x86_64 and aarch64: its markers resolved for each target, the dependencies
  followed through each pinned release's metadata (tests/system/lockfile.py).
- With Debian's ``/usr/bin/python3`` (3.11.2 on Debian 12, below the 3.11.3 where ``redis``
  stops needing ``async-timeout``), ``make venv``, ``make run`` and ``make test`` work: run
  here for real, through the Makefile, into a virtualenv of their own.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from packaging.utils import NormalizedName

from tests.serverproc import REPO_ROOT

from . import lockfile

# (CPython, Linux machine): 3.11.0-3.11.2 (Debian 12's) need async-timeout, 3.11.3 on do not
TARGETS = [
    (python, machine)
    for python in ("3.11.0", "3.11.2", "3.11.3", "3.12.0", "3.13.0")
    for machine in ("x86_64", "aarch64")
]
DEBIAN_PYTHON = Path("/usr/bin/python3")


@pytest.fixture(scope="module")
def releases() -> dict[NormalizedName, lockfile.Release]:
    return lockfile.fetch_releases(lockfile.read_lock().values())


def test_the_lock_pins_hashes_only_with_markers() -> None:
    pins = lockfile.read_lock()
    assert all(pin.hashes for pin in pins.values()), "every pin carries its hashes"
    for requirement in lockfile.runtime_requirements():
        assert lockfile.canonicalize_name(requirement.name) in pins, requirement
    # redis needs async-timeout below 3.11.3 only: the marker says so, not the resolving Python
    timeout = pins[lockfile.canonicalize_name("async-timeout")]
    env = lockfile.marker_environment
    assert timeout.applies(env("3.11.2", "x86_64")) and not timeout.applies(env("3.11.3", "x86_64"))
    header = lockfile.LOCK.read_text().split("\n", 3)[:3]
    assert any("make lock" in line for line in header), "the lock says how it is made"


@pytest.mark.parametrize(("python", "machine"), TARGETS, ids=[f"{p}-{m}" for p, m in TARGETS])
def test_the_lock_installs_every_runtime_dependency(
    python: str, machine: str, releases: dict[NormalizedName, lockfile.Release]
) -> None:
    pins = lockfile.read_lock()
    found = lockfile.problems(python, machine, pins, releases, lockfile.runtime_requirements())
    assert not found, f"requirements.lock on CPython {python}, {machine}: run `make lock`\n" + (
        "\n".join(found)
    )


# --------------------------------------------------------------------------------------------
# Debian 12's own Python


def _interpreter(python: str | Path) -> str:
    done = subprocess.run(
        [str(python), "-c", "import sys; print(sys.base_prefix, sys.version)"],
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


def _make_env() -> dict[str, str]:
    """This machine's environment without what ties it to the suite's own run."""
    dropped = ("CHAT_", "PYTEST_", "VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")
    env = {k: v for k, v in os.environ.items() if not k.startswith(dropped)}
    env.pop("GEMINI_API_KEY", None)
    env.pop("GOOGLE_API_KEY", None)
    return env


def _make(venv: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "--no-print-directory", *args, f"PYTHON={DEBIAN_PYTHON}", f"VENV={venv}"],
        cwd=REPO_ROOT,
        env=_make_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.heavy
@pytest.mark.timeout(900)
def test_debian_python_makes_the_venv_runs_and_tests(tmp_path: Path) -> None:
    if not DEBIAN_PYTHON.exists():
        pytest.fail(f"{DEBIAN_PYTHON} is missing: this is not Debian (apt-get install python3)")
    if _interpreter(DEBIAN_PYTHON) == _interpreter(sys.executable):
        pytest.skip("the suite itself runs on Debian's Python: every test here proves it")
    version = _interpreter(DEBIAN_PYTHON).split()[1]  # "3.11.2" on Debian 12
    venv = tmp_path / "venv"

    built = _make(venv, "venv")
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-5000:]
    assert _interpreter(venv / "bin" / "python").split()[1] == version
    check = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "check"], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr

    # make run: the server on Debian's Python serves the page and /healthz
    proc = subprocess.Popen(
        ["make", "--no-print-directory", "run", f"PYTHON={DEBIAN_PYTHON}", f"VENV={venv}",
         f"ARGS=--port 0 --sqlite-path {tmp_path / 'run.sqlite3'}"],
        cwd=REPO_ROOT,
        env=_make_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,  # make and its server in one group, stopped together
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        url = None
        for line in proc.stdout:  # make prints its command line first
            found = re.search(r"(http://127\.0\.0\.1:\d+/)", line)
            if found:
                url = found.group(1)
                break
        assert url is not None, f"make run printed no URL (exit {proc.wait(5)})"
        with urllib.request.urlopen(f"{url}healthz", timeout=10) as health:
            assert health.status == 200
        with urllib.request.urlopen(url, timeout=10) as page:
            assert page.status == 200 and b"<script" in page.read()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)

    # make test: the whole suite collects on Debian's Python, and a part of it runs there
    args = f"-p no:cacheprovider --basetemp={tmp_path / 'pytest'}"
    collected = _make(venv, "test", f"PYTEST_ARGS={args} --collect-only -q", "TEST_WORKERS=0")
    assert collected.returncode == 0, collected.stdout[-5000:] + collected.stderr[-3000:]
    assert re.search(r"^\d{3,} tests collected", collected.stdout, re.M), collected.stdout[-500:]
    ran = _make(venv, "test", f"PYTEST_ARGS={args} {' '.join(DEBIAN_SAMPLE)}")
    assert ran.returncode == 0, ran.stdout[-5000:] + ran.stderr[-3000:]
    assert f"Python {version}," in ran.stdout, ran.stdout[:500]  # pytest's header
    assert re.search(r"\b\d+ passed\b", ran.stdout) and " failed" not in ran.stdout, ran.stdout


# a few quick modules that cover the protocol, the stores and the server in process
DEBIAN_SAMPLE = (
    "tests/protocol/test_ids.py",
    "tests/chatserver/test_smoke.py",
)
