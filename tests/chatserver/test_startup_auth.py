"""Start-up refuses the auth configurations that would hand out tokens to anyone: an empty
secret, and dev auth mode where it could be reached or would hold real data."""

from __future__ import annotations

import os
import subprocess
import sys

import jwt
import pytest

from chatserver.app import create_app
from chatserver.settings import Settings, SettingsError
from tests.serverproc import ServerProc, free_port

SECRET = "startup-test-secret-0123456789abcdef0123456"


def _serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``chatserver serve`` that must stop on its own: a server that starts is a failure."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("CHAT_")}
    environ.update(env or {})
    command = [sys.executable, "-m", "chatserver", "serve", "--port", str(free_port()), *args]
    try:
        return subprocess.run(command, env=environ, capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"the server started: {exc.stderr!r}") from None


@pytest.mark.parametrize(
    "env",
    [
        {"CHAT_JWT_SECRET": ""},
        {"CHAT_JWT_SECRET": SECRET, "CHAT_JWT_SECRET_PREVIOUS": ""},
    ],
    ids=["secret", "previous"],
)
def test_an_empty_secret_is_refused(env: dict[str, str]) -> None:
    done = _serve(env=env)
    assert done.returncode == 2, done.stderr
    name = next(iter(k for k, v in env.items() if v == ""))
    assert f"{name}: set but empty" in done.stderr


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--host", "0.0.0.0"], "on host '0.0.0.0'"),
        (["--redis-url", "redis://127.0.0.1:1/0"], "CHAT_REDIS_URL"),
        (["--database-url", "postgresql://u@127.0.0.1:1/chat"], "CHAT_DATABASE_URL"),
    ],
    ids=["host", "redis", "postgres"],
)
def test_dev_auth_is_refused_off_loopback_and_with_real_backends(
    args: list[str], named: str
) -> None:
    done = _serve(*args)  # nothing listens on port 1: refused before any connection is tried
    assert done.returncode == 2, done.stderr
    assert named in done.stderr and "CHAT_ALLOW_DEV_AUTH" in done.stderr


def test_dev_auth_on_all_interfaces_starts_when_allowed() -> None:
    with ServerProc(args=["--host", "0.0.0.0"], env={"CHAT_ALLOW_DEV_AUTH": "yes"}) as server:
        assert server.running


def test_the_app_factory_refuses_too() -> None:
    """In-process servers (tests, benchmarks) go through the same rule."""
    with pytest.raises(SettingsError, match="CHAT_REDIS_URL"):
        create_app(Settings.of(redis_url="redis://127.0.0.1:1/0"))
    with pytest.raises(SettingsError, match="not loopback"):
        create_app(Settings.of(host="10.1.2.3"))
    for allowed in (
        Settings.of(host="::1"),
        Settings.of(host="localhost"),
        Settings.of(host="127.0.0.2"),
        Settings.of(host="0.0.0.0", jwt_secret=SECRET, redis_url="redis://127.0.0.1:1/0"),
        Settings.of(redis_url="redis://127.0.0.1:1/0", allow_dev_auth=True),
    ):
        allowed.check_dev_auth()


def _token(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "chatserver", "token", "--user", "alice", *args]
    return subprocess.run(
        command, env={**env, "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=30
    )


def test_the_token_command_adds_audience_and_issuer_and_keeps_the_lifetime_cap() -> None:
    env = {
        "CHAT_JWT_SECRET": SECRET,
        "CHAT_JWT_AUDIENCE": "chat",
        "CHAT_JWT_ISSUER": "https://id.example",
        "CHAT_JWT_MAX_LIFETIME_S": "600",
    }
    done = _token("--ttl", "60", env=env)
    assert done.returncode == 0, done.stderr
    claims = jwt.decode(
        done.stdout.strip(),
        SECRET,
        algorithms=["HS256"],
        audience="chat",
        issuer="https://id.example",
    )
    assert claims["exp"] - claims["iat"] == 60
    over = _token("--ttl", "601", env=env)
    assert over.returncode == 2 and "CHAT_JWT_MAX_LIFETIME_S" in over.stderr
    empty = _token(env={"CHAT_JWT_SECRET": ""})
    assert empty.returncode == 2 and "CHAT_JWT_SECRET" in empty.stderr
