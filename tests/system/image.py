"""Build the repository's Dockerfile for real with buildah, on a Debian 12 base made here.

No registry image can be pulled on the test machines and no container daemon runs there, so:

- the base image is a Debian 12 ("bookworm") root file system made by ``debootstrap`` from the
  Debian mirror apt already uses (read from /etc/apt/sources.list and sources.list.d), with
  ``python3``, ``python3-venv`` and ``python-is-python3`` (the Dockerfile's RUN lines call
  ``python``): the parts of ``python:3.11-slim-bookworm`` the Dockerfile relies on. The tarred
  root file system is kept in the test cache (tests/cachedir.py), named by what went into it,
  so the next run on this machine does not debootstrap again;
- each build imports it into a container storage of its own (a temporary directory: nothing
  is left in the machine's own /var/lib/containers) and passes it through the Dockerfile's
  ``PYTHON_IMAGE`` argument to ``buildah bud --isolation chroot`` (no daemon, no cgroups);
- ``buildah run --isolation chroot --network host`` starts a container of the built image
  (``podman run`` cannot start containers here: setrlimit is refused).

This machine reaches PyPI through a TLS proxy whose CA only its own trust store knows: the
base image gets this machine's CA bundle and ``PIP_CERT`` naming it, as a base image of this
machine's would (``python:3.11-slim-bookworm`` on a machine with open access needs neither).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.cachedir import cache_dir, locked
from tests.serverproc import REPO_ROOT

SUITE = "bookworm"  # Debian 12, as python:3.11-slim-bookworm
PACKAGES = ("python3", "python3-venv", "python-is-python3", "ca-certificates")
BASE_TAG = "localhost/chatserver-test-base:bookworm"
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
DEBOOTSTRAP_TIMEOUT_S = 900
BUILD_TIMEOUT_S = 900


class ImageError(RuntimeError):
    """A tool is missing or a build step failed; the message carries its output."""


def _sources() -> Iterator[tuple[str, list[str], list[str]]]:
    """(URI, suites, components) of every ``deb`` source apt uses (one-line and deb822)."""
    files = [Path("/etc/apt/sources.list")]
    files += sorted(Path("/etc/apt/sources.list.d").glob("*.list"))
    for path in files:
        if not path.is_file():
            continue
        for raw in path.read_text().splitlines():
            words = re.sub(r"\[[^]]*\]", "", raw.split("#", 1)[0]).split()
            if len(words) >= 3 and words[0] == "deb":
                yield words[1], [words[2]], words[3:]
    for path in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        for stanza in re.split(r"\n\s*\n", path.read_text()):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if line.startswith("#") or ":" not in line or line[:1].isspace():
                    continue
                key, _, value = line.partition(":")
                fields[key.strip().lower()] = value.strip()
            if "deb" not in fields.get("types", "").split():
                continue
            if fields.get("enabled", "yes").lower() == "no":
                continue
            suites = fields.get("suites", "").split()
            components = fields.get("components", "").split()
            for uri in fields.get("uris", "").split():
                yield uri, suites, components


def debian_mirror() -> str:
    """The Debian archive apt uses here: a source of Debian's main (not security, not others)."""
    candidates = []
    for uri, suites, components in _sources():
        if "main" not in components or any(s.endswith("-security") for s in suites):
            continue
        if "/debian" not in uri or "security" in uri:
            continue
        candidates.append((SUITE not in suites, uri))  # one that names bookworm first
    if not candidates:
        raise ImageError("no Debian mirror in /etc/apt/sources.list{,.d}: debootstrap needs one")
    return sorted(candidates)[0][1]


def _run(
    argv: Sequence[str], *, timeout: float, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    try:
        done = subprocess.run(
            list(argv),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
    except subprocess.TimeoutExpired as exc:
        raise ImageError(f"{' '.join(argv)}: no end within {timeout:.0f} s") from exc
    if done.returncode != 0:
        raise ImageError(
            f"{' '.join(argv)} exited with {done.returncode}:\n"
            f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
        )
    return done


def _tool(name: str) -> str:
    found = shutil.which(name) or next(
        (p for d in ("/usr/sbin", "/usr/bin", "/sbin") if os.access(p := f"{d}/{name}", os.X_OK)),
        None,
    )
    if found is None:
        raise ImageError(f"{name} is not installed: run `make deps` (Debian package {name})")
    return found


def _architecture() -> str:
    return _run(["dpkg", "--print-architecture"], timeout=30).stdout.strip()


def base_rootfs() -> Path:
    """The base image's root file system as a tarball, from the cache or debootstrapped now."""
    debootstrap = _tool("debootstrap")
    inputs = {
        "suite": SUITE,
        "mirror": debian_mirror(),
        "architecture": _architecture(),
        "variant": "minbase",
        "packages": sorted(PACKAGES),
        "debootstrap": _run([debootstrap, "--version"], timeout=30).stdout.strip(),
    }
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]
    where = cache_dir("debootstrap")
    tarball = where / f"{SUITE}-{key}.tar"
    with locked(where / f"{SUITE}-{key}.lock"):  # one debootstrap at a time for one key
        if tarball.exists():
            return tarball
        work = Path(tempfile.mkdtemp(prefix="rootfs-", dir=where))
        try:
            rootfs = work / "rootfs"
            _run(
                [
                    debootstrap,
                    "--variant=minbase",
                    f"--include={','.join(PACKAGES)}",
                    f"--arch={inputs['architecture']}",
                    SUITE,
                    str(rootfs),
                    str(inputs["mirror"]),
                ],
                timeout=DEBOOTSTRAP_TIMEOUT_S,
            )
            for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):  # as slim images do
                for entry in (rootfs / cache).glob("*"):
                    if entry.is_file():
                        entry.unlink()
            (work / "inputs.json").write_text(json.dumps(inputs, indent=2))
            partial = work / "rootfs.tar"
            _run(
                ["tar", "-C", str(rootfs), "--numeric-owner", "--xattrs", "-cf", str(partial), "."],
                timeout=600,
            )
            partial.replace(tarball)
            (where / f"{SUITE}-{key}.json").write_text(json.dumps(inputs, indent=2))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return tarball


@dataclass
class Buildah:
    """buildah on a container storage of its own (``root``), chroot isolation throughout."""

    root: Path

    def __post_init__(self) -> None:
        self.binary = _tool("buildah")
        (self.root / "storage").mkdir(parents=True, exist_ok=True)
        (self.root / "run").mkdir(parents=True, exist_ok=True)

    def argv(self, *args: str) -> list[str]:
        return [
            self.binary,
            "--root", str(self.root / "storage"),
            "--runroot", str(self.root / "run"),
            "--storage-driver", "overlay",
            *args,
        ]  # fmt: skip

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("BUILDAH_", "CHAT_"))}
        env["BUILDAH_ISOLATION"] = "chroot"
        env["TMPDIR"] = str(self.root)  # buildah's scratch space, removed with the storage
        return env

    def __call__(self, *args: str, timeout: float = 300) -> str:
        return _run(self.argv(*args), timeout=timeout, env=self.env()).stdout

    def import_base(self, tarball: Path) -> str:
        """The debootstrapped root file system as the image ``BASE_TAG``."""
        container = self("from", "--pull=never", "scratch").strip()
        try:
            self("add", container, str(tarball), "/", timeout=600)
            if CA_BUNDLE.is_file():  # this machine's trust store (its TLS proxy's CA)
                self("copy", container, str(CA_BUNDLE), str(CA_BUNDLE))
            self(
                "config",
                "--env", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "--env", "LANG=C.UTF-8",
                "--env", f"PIP_CERT={CA_BUNDLE}",
                "--cmd", "python3",
                container,
            )  # fmt: skip
            self("commit", "--quiet", "--format", "docker", container, BASE_TAG, timeout=600)
        finally:
            self("rm", container)
        return BASE_TAG

    def build(self, tag: str, *, context: Path = REPO_ROOT, target: str | None = None) -> str:
        """``buildah bud`` of the repository's Dockerfile on the imported base."""
        args = [
            "bud",
            "--isolation", "chroot",
            "--network", "host",
            "--pull=never",
            "--layers",
            "--format", "docker",  # HEALTHCHECK and STOPSIGNAL are Docker image config
            "--build-arg", f"PYTHON_IMAGE={BASE_TAG}",
            "-f", str(context / "Dockerfile"),
            "-t", tag,
        ]  # fmt: skip
        if target is not None:
            args += ["--target", target]
        return self(*args, str(context), timeout=BUILD_TIMEOUT_S)

    def inspect(self, image: str) -> dict[str, Any]:
        found: dict[str, Any] = json.loads(self("inspect", "--type", "image", image))
        return found

    def container(self, image: str) -> str:
        return self("from", "--pull=never", image).strip()

    def run_argv(self, container: str, command: Sequence[str], env: dict[str, str]) -> list[str]:
        argv = ["run", "--isolation", "chroot", "--network", "host"]
        for key, value in env.items():
            argv += ["--env", f"{key}={value}"]
        return self.argv(*argv, container, "--", *command)

    def run(
        self, container: str, command: Sequence[str], env: dict[str, str], timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.run_argv(container, command, env),
            env=self.env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def files(self, container: str, under: str) -> list[str]:
        """The paths of the files below ``under`` in a container's file system."""
        mount = Path(self("mount", container).strip())
        try:
            top = mount / under.lstrip("/")
            return sorted(p.relative_to(top).as_posix() for p in top.rglob("*") if p.is_file())
        finally:
            self("umount", container)

    def close(self) -> None:
        """Remove every container and image, then the storage itself."""
        for args in (("rm", "--all"), ("rmi", "--all", "--force")):
            subprocess.run(self.argv(*args), env=self.env(), capture_output=True, timeout=300)
        # overlay mounts of the storage must be gone before the tree is removed
        subprocess.run(
            ["umount", "-R", str(self.root / "storage" / "overlay")], capture_output=True
        )
        shutil.rmtree(self.root, ignore_errors=True)
