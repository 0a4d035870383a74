"""requirements.lock, read and checked against PyPI for a target interpreter and platform.

The lock is one universal lock (``make lock``): a pin per line, each with an environment marker
where it is needed on some interpreters or platforms only (``async-timeout`` below Python
3.11.3), and the sha256 of every wheel of that release. What this module answers, for a target
(CPython version, Linux machine) without running that interpreter:

- which pins apply there (their markers, evaluated for the target, not for this process);
- whether the pins are closed under the dependencies: starting from ``pyproject.toml``'s
  ``dependencies``, every requirement that applies there (its marker, the extras asked for),
  recursively through each pinned release's metadata, is pinned at a version it accepts;
- whether every pin that applies has a wheel among its hashes that installs there.

The file names of the hashes come from PyPI's index (its JSON form), the index the lock was
resolved against; each release's metadata (``Requires-Dist``, ``Requires-Python``) from the
METADATA of its smallest hashed wheel, downloaded once per machine into the test cache
(tests/cachedir.py) and checked against its hash.
"""

from __future__ import annotations

import hashlib
import json
import os
import tomllib
import urllib.request
import zipfile
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from email.message import Message
from email.parser import Parser
from pathlib import Path
from typing import Any

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.tags import Tag, compatible_tags, cpython_tags
from packaging.utils import NormalizedName, canonicalize_name, parse_wheel_filename
from packaging.version import Version

from tests.cachedir import cache_dir
from tests.serverproc import REPO_ROOT

LOCK = REPO_ROOT / "requirements.lock"
SIMPLE_JSON = "https://pypi.org/simple/{name}/"  # PEP 691: every file of a project, hashed
SIMPLE_ACCEPT = "application/vnd.pypi.simple.v1+json"
DEBIAN_12_GLIBC = (2, 36)  # the newest manylinux a wheel may need: Debian 12 (and the image)


@dataclass
class Pin:
    name: NormalizedName
    version: str
    marker: Marker | None
    hashes: set[str] = field(default_factory=set)

    def applies(self, env: dict[str, str]) -> bool:
        return self.marker is None or self.marker.evaluate(env)


@dataclass
class Release:
    """One pinned release as PyPI describes it."""

    requires_dist: list[Requirement]
    requires_python: SpecifierSet
    files: dict[str, str]  # sha256 -> file name


def read_lock(path: Path = LOCK) -> dict[NormalizedName, Pin]:
    pins: dict[NormalizedName, Pin] = {}
    current: Pin | None = None
    for line in path.read_text().splitlines():
        text = line.strip().removesuffix("\\").strip()
        if not text or text.startswith("#"):
            continue
        if text.startswith("--hash="):
            algorithm, _, digest = text.removeprefix("--hash=").partition(":")
            assert current is not None and algorithm == "sha256", line
            current.hashes.add(digest)
            continue
        requirement = Requirement(text)
        (spec,) = requirement.specifier
        assert spec.operator == "==", f"not pinned with ==: {line}"
        name = canonicalize_name(requirement.name)
        assert name not in pins, f"{name} pinned twice"
        current = pins[name] = Pin(name, spec.version, requirement.marker)
    return pins


def runtime_requirements() -> list[Requirement]:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(text) for text in project["dependencies"]]


def marker_environment(python: str, machine: str) -> dict[str, str]:
    """PEP 508 marker variables of CPython ``python`` (e.g. "3.11.2") on Linux ``machine``."""
    major_minor = ".".join(python.split(".")[:2])
    return {
        "implementation_name": "cpython",
        "implementation_version": python,
        "os_name": "posix",
        "platform_machine": machine,
        "platform_python_implementation": "CPython",
        "platform_release": "",
        "platform_system": "Linux",
        "platform_version": "",
        "python_full_version": python,
        "python_version": major_minor,
        "sys_platform": "linux",
    }


def wheel_tags(python: str, machine: str) -> set[Tag]:
    """The wheel tags pip accepts for CPython ``python`` on glibc Linux ``machine``."""
    major, minor = (int(part) for part in python.split(".")[:2])
    glibc_major, glibc_minor = DEBIAN_12_GLIBC
    platforms = [f"manylinux_{glibc_major}_{m}_{machine}" for m in range(glibc_minor, 4, -1)]
    legacy = {"manylinux2014": 17, "manylinux2010": 12, "manylinux1": 5}
    platforms += [f"{alias}_{machine}" for alias in legacy]  # pip knows the old names too
    platforms.append(f"linux_{machine}")
    interpreter = f"cp{major}{minor}"
    return {
        *cpython_tags((major, minor), [interpreter], platforms),
        *compatible_tags((major, minor), interpreter, platforms),
    }


def _get(url: str, accept: str = "*/*") -> bytes:
    request = urllib.request.Request(url, headers={"Accept": accept})
    with urllib.request.urlopen(request, timeout=120) as response:
        body: bytes = response.read()
        return body


def _wheel_metadata(file: dict[str, Any]) -> Message:
    """The METADATA of one wheel, downloaded once per machine (kept by its sha256)."""
    digest = file["hashes"]["sha256"]
    cached = cache_dir("wheels") / digest[:2] / file["filename"]
    if not cached.exists() or hashlib.sha256(cached.read_bytes()).hexdigest() != digest:
        body = _get(file["url"])
        assert hashlib.sha256(body).hexdigest() == digest, f"{file['url']}: not the hashed file"
        cached.parent.mkdir(parents=True, exist_ok=True)
        partial = cached.with_name(f"{cached.name}.{os.getpid()}.part")
        partial.write_bytes(body)
        partial.replace(cached)
    with zipfile.ZipFile(cached) as wheel:
        (name,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
        return Parser().parsestr(wheel.read(name).decode())


def _fetch(pin: Pin) -> Release:
    index = json.loads(_get(SIMPLE_JSON.format(name=pin.name), SIMPLE_ACCEPT))
    files = {f["hashes"]["sha256"]: f for f in index["files"] if f["hashes"].get("sha256")}
    hashed = [files[h] for h in sorted(pin.hashes) if h in files]
    wheels = [f for f in hashed if f["filename"].endswith(".whl")]
    assert wheels, f"{pin.name}=={pin.version}: no wheel among its hashes on PyPI"
    metadata = _wheel_metadata(min(wheels, key=lambda f: int(f["size"])))
    assert canonicalize_name(metadata["Name"]) == pin.name and metadata["Version"] == pin.version
    return Release(
        requires_dist=[Requirement(text) for text in metadata.get_all("Requires-Dist") or []],
        requires_python=SpecifierSet(metadata.get("Requires-Python") or ""),
        files={digest: f["filename"] for digest, f in files.items()},
    )


def fetch_releases(pins: Iterable[Pin]) -> dict[NormalizedName, Release]:
    pins = list(pins)
    with ThreadPoolExecutor(max_workers=8) as pool:
        releases = pool.map(_fetch, pins)
        return {pin.name: release for pin, release in zip(pins, releases, strict=True)}


def problems(
    python: str,
    machine: str,
    pins: dict[NormalizedName, Pin],
    releases: dict[NormalizedName, Release],
    roots: list[Requirement],
) -> list[str]:
    """What keeps the lock from installing on CPython ``python``, Linux ``machine``."""
    env = marker_environment(python, machine)
    tags = wheel_tags(python, machine)
    found: list[str] = []
    reached: set[NormalizedName] = set()
    extras_seen: dict[NormalizedName, set[str]] = {}
    pending: list[tuple[Requirement, str]] = [(r, "pyproject.toml") for r in roots]
    while pending:
        requirement, wanted_by = pending.pop()
        name = canonicalize_name(requirement.name)
        pin = pins.get(name)
        if pin is None:
            found.append(f"{requirement} (for {wanted_by}) is not pinned")
            continue
        if not pin.applies(env):
            found.append(f"{requirement} (for {wanted_by}) is pinned under {pin.marker}, false")
            continue
        if not requirement.specifier.contains(pin.version, prereleases=True):
            found.append(f"{name}=={pin.version} does not meet {requirement} (for {wanted_by})")
        extras = {""} | set(requirement.extras)
        if name in reached and extras <= extras_seen[name]:
            continue
        new = extras - extras_seen.get(name, set())
        reached.add(name)
        extras_seen.setdefault(name, set()).update(extras)
        release = releases[name]
        for dependency in release.requires_dist:
            marker = dependency.marker
            if marker is None:
                wanted = "" in new
            else:
                wanted = any(marker.evaluate({**env, "extra": extra}) for extra in new)
            if wanted:
                pending.append((dependency, f"{name}=={pin.version}"))

    python_version = Version(python)
    for name in sorted(reached):
        pin, release = pins[name], releases[name]
        if not release.requires_python.contains(python_version, prereleases=True):
            found.append(f"{name}=={pin.version} requires Python {release.requires_python}")
        unknown = pin.hashes - release.files.keys()
        if unknown:
            found.append(f"{name}=={pin.version}: hashes of no file on PyPI: {sorted(unknown)}")
        wheels = [release.files[h] for h in pin.hashes & release.files.keys()]
        if not any(
            parse_wheel_filename(wheel)[3] & tags for wheel in wheels if wheel.endswith(".whl")
        ):
            found.append(f"{name}=={pin.version}: no wheel for CPython {python} on {machine}")
    stray = sorted(n for n, pin in pins.items() if pin.applies(env) and n not in reached)
    if stray:
        found.append(f"pinned for this target, but nothing needs them: {stray}")
    return found
