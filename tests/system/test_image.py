"""The Dockerfile, built for real and run: buildah on a debootstrapped Debian 12 base.

tests/system/image.py says how (no registry, no daemon here). One build per run, shared by
the tests of this module (one xdist worker runs them all: tests/conftest.py, SHARED_MODULES):

- the image's promises, read from the built image's own config (what Docker would run):
  non-root user, exec-form CMD and no ENTRYPOINT, the exec-form HEALTHCHECK on /healthz,
  STOPSIGNAL; the build stage installs the hashed lock, then the package, not editable; the
  build context holds what .dockerignore lets in and nothing else;
- a container of the image migrates a Postgres database, serves the page, /healthz and a
  WebSocket conversation (a dev token, a conversation, a message, the agent's reply) as user
  10001; its HEALTHCHECK passes while it serves and fails once it stopped; SIGTERM drains it
  and it exits 0, its SQLite file where the image's env puts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from chatclient.client import ChatApi, ChatClient
from protocol import GenStart
from tests.serverproc import REPO_ROOT, free_port

from . import image

TAG = "localhost/chatserver-test:latest"
BUILD_TAG = "localhost/chatserver-test-build:latest"
pytestmark = [pytest.mark.heavy, pytest.mark.timeout(1500)]


@dataclass
class Built:
    buildah: image.Buildah
    config: dict[str, Any]  # the runtime image's Docker config
    history: list[str]  # the build stage's steps, as the image records them
    context: list[str]  # the files the build stage's COPY lines brought in (/src)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Built]:
    buildah: image.Buildah | None = None
    try:
        buildah = image.Buildah(tmp_path_factory.mktemp("buildah"))
        buildah.import_base(image.base_rootfs())
        buildah.build(TAG)
        buildah.build(BUILD_TAG, target="build")  # the first stage: its layers are cached
        stage = buildah.inspect(BUILD_TAG)
        build_container = buildah.container(BUILD_TAG)
        result = Built(
            buildah,
            buildah.inspect(TAG)["Docker"]["config"],
            [step.get("created_by", "") for step in stage["Docker"]["history"]],
            buildah.files(build_container, "/src"),
        )
    except BaseException as exc:
        if buildah is not None:
            buildah.close()
        if isinstance(exc, image.ImageError):
            pytest.fail(str(exc), pytrace=False)
        raise
    try:
        yield result
    finally:
        buildah.close()


def _dockerfile_instructions() -> list[str]:
    text = (REPO_ROOT / "Dockerfile").read_text()
    lines = re.sub(r"\\\n", " ", text).splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def test_dockerfile_promises(built: Built) -> None:
    config = built.config
    user = config["User"]
    assert user and user.split(":")[0] not in ("0", "root"), f"runs as {user!r}"
    assert config["Cmd"] == ["chatserver", "serve"]  # exec form: the server is PID 1
    assert not config.get("Entrypoint"), "nothing (no shell) between docker and the server"
    assert config["StopSignal"] == "SIGTERM"
    check = config["Healthcheck"]
    assert check["Test"][0] == "CMD", "exec form, no shell"
    assert "/healthz" in " ".join(check["Test"])
    assert all(check.get(key) for key in ("Interval", "Timeout", "Retries"))
    env = dict(item.split("=", 1) for item in config["Env"])
    assert (env["CHAT_HOST"], env["CHAT_PORT"]) == ("0.0.0.0", "8080")
    assert env["PATH"].startswith("/opt/venv/bin:")
    assert config["WorkingDir"] == "/data" and "8080/tcp" in config["ExposedPorts"]

    # the build stage: exactly the hashed lock, prebuilt wheels, then the package, not editable
    steps = " ".join(built.history)
    assert "--require-hashes" in steps and "--only-binary=:all:" in steps
    assert "-r requirements.lock" in steps
    assert "install --no-deps ." in steps and "-e ." not in steps and 'pip" check' in steps

    # the context, through .dockerignore: the lock, the metadata, the packages, nothing else
    assert {"requirements.lock", "pyproject.toml", "chatserver/static/index.html"} <= set(
        built.context
    )
    top = {path.split("/", 1)[0] for path in built.context}
    assert not top & {"tests", "bench", "deploy", "docs", ".git", ".venv", "scripts"}, top
    stray = [p for p in built.context if "__pycache__" in p or re.search(r"\.(pyc|sqlite3)", p)]
    assert not stray, stray

    # for users: the default base is the official slim image, configured by CHAT_* env only
    instructions = _dockerfile_instructions()
    args = [line for line in instructions if line.upper().startswith("ARG ")]
    assert args == ["ARG PYTHON_IMAGE=python:3.11-slim-bookworm"], args
    froms = [line for line in instructions if line.upper().startswith("FROM ")]
    assert froms == ["FROM ${PYTHON_IMAGE} AS build", "FROM ${PYTHON_IMAGE} AS runtime"], froms


def _get(url: str) -> tuple[int, str, bytes]:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.status, response.headers.get("Content-Type", ""), response.read()


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found: list[int] = []
    pending = [pid]
    while pending:
        for child in children.get(pending.pop(), []):
            found.append(child)
            pending.append(child)
    return found


def _server_pid(runner: subprocess.Popen[bytes]) -> int:
    """The image's CMD as a process: the one ``buildah run`` execs (not buildah's helpers)."""
    for pid in _descendants(runner.pid):
        with contextlib.suppress(OSError):
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if comm.startswith(("buildah", "memfd:")):
                continue
            if b"serve" in argv and any(arg.endswith(b"chatserver") for arg in argv):
                return pid
    raise AssertionError(f"no server process under buildah run {runner.pid}")


def _uid(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^Uid:\s+(\d+)", status, re.M)[1])  # type: ignore[index]


async def _round_trip(url: str, ws_url: str) -> str:
    """A dev token, a conversation, a message, and the agent's whole reply."""
    async with aiohttp.ClientSession() as http:
        api = ChatApi(url, None, http)
        api.token = await api.dev_token("alice")
        conversation = str((await api.create_conversation())["id"])
    client = await ChatClient.connect(ws_url, api.token)
    try:
        await client.join(conversation)
        ack = await client.send(conversation, "hello from the image test")
        start = await client.expect(GenStart, timeout=30)
        reply = await client.follow(start.generation_id, start, timeout=60)
        assert reply.end is not None and reply.end.finish_reason == "stop", reply
        assert ack.message_id and reply.text
        return reply.text
    finally:
        await client.close()


def test_the_image_serves_a_conversation(built: Built, postgres_dsn: str, tmp_path: Path) -> None:
    buildah = built.buildah
    container = buildah.container(TAG)

    # the packaged migrations apply (the compose file's `migrate` job runs this command)
    migrate = buildah.run(container, ["chatserver", "migrate"], {"CHAT_DATABASE_URL": postgres_dsn})
    assert migrate.returncode == 0, migrate.stdout + migrate.stderr
    assert "migrations applied" in migrate.stdout

    port = free_port()
    # The rest from the image's own env (CHAT_HOST=0.0.0.0, /data). Dev auth off loopback is
    # refused unless asked for: the test asks, as a user trying the image without a secret would.
    env = {"CHAT_PORT": str(port), "CHAT_ALLOW_DEV_AUTH": "yes"}
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        runner = subprocess.Popen(
            buildah.run_argv(container, built.config["Cmd"], env),
            env=buildah.env(),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert runner.poll() is None, f"exited {runner.returncode}:\n{log.read_text()[-3000:]}"
            with contextlib.suppress(OSError):
                if _get(f"{url}/healthz")[0] == 200:
                    break
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        server = _server_pid(runner)
        assert _uid(server) == 10001, "the image's USER, not root"

        status, kind, body = _get(f"{url}/")
        assert status == 200 and kind.startswith("text/html") and b"<html" in body.lower()
        assert _get(f"{url}/static/app.js")[0] == 200
        assert asyncio.run(_round_trip(url, f"ws://127.0.0.1:{port}/ws"))

        check = built.config["Healthcheck"]["Test"][1:]  # run as Docker would, in the container
        healthy = buildah.run(container, check, env, 60)
        assert healthy.returncode == 0, healthy.stdout + healthy.stderr

        os.kill(server, signal.SIGTERM)  # the image's STOPSIGNAL, to its PID 1, as docker stop
        code = runner.wait(60)
        assert code == 0, log.read_text()[-3000:]
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait()
    output = log.read_text()
    assert "chatserver listening on" in output and '"event": "stopped"' in output, output[-3000:]
    assert "chatserver.sqlite3" in buildah.files(container, "/data")  # CHAT_SQLITE_PATH
    down = buildah.run(container, check, env, 60)
    assert down.returncode != 0, "the health check notices a stopped server"
