"""Read the repository's Dockerfile and .dockerignore, enough to replay the build stage.

No Docker engine runs on the test machines, so tests/system/test_deploy.py does what the build
stage does by hand: the same COPY sources (filtered by .dockerignore as Docker filters the
build context), the same ENV, the same RUN commands, and then the runtime stage's CMD and
HEALTHCHECK. This module parses just the Dockerfile subset the repository uses: instructions
with ``\\`` continuations, comments, ``ARG`` defaults in ``FROM``, ``ENV k=v ...``, exec-form
(JSON) ``CMD`` and ``HEALTHCHECK ... CMD``.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from tests.serverproc import REPO_ROOT

DOCKERFILE = REPO_ROOT / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str | None:
        found = self.all(keyword)
        return found[-1] if found else None

    def env(self) -> dict[str, str]:
        """The stage's ENV, in order (a value may refer to an earlier one or the base's)."""
        out: dict[str, str] = {}
        for args in self.all("ENV"):
            for item in shlex.split(args):
                key, sep, value = item.partition("=")
                if not sep:
                    raise ValueError(f"ENV {args!r}: only the key=value form is understood")
                out[key] = value
        return out

    def exec_form(self, keyword: str) -> list[str] | None:
        args = self.last(keyword)
        if args is None:
            return None
        value = json.loads(args)
        if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise ValueError(f"{keyword} {args!r} is not the exec (JSON array) form")
        return value


def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) pairs, continuations joined, comments and blank lines dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        text = pending + line
        pending = ""
        keyword, _, args = text.partition(" ")
        out.append((keyword.upper(), " ".join(args.split())))
    if pending:
        raise ValueError(f"{path}: the last instruction ends with a continuation")
    return out


def stages(path: Path = DOCKERFILE) -> list[Stage]:
    args: dict[str, str] = {}
    found: list[Stage] = []
    for keyword, rest in instructions(path):
        if keyword == "FROM":
            words = rest.split()
            base = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m[1] or m[2]], words[0])
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            found.append(Stage(base, name))
        elif not found:
            if keyword != "ARG":
                raise ValueError(f"{keyword} before the first FROM")
            key, _, default = rest.partition("=")
            args[key] = default
        else:
            found[-1].instructions.append((keyword, rest))
    return found


def healthcheck(stage: Stage) -> tuple[dict[str, str], list[str]]:
    """The HEALTHCHECK options and its exec-form command."""
    args = stage.last("HEALTHCHECK")
    if args is None:
        raise ValueError("no HEALTHCHECK")
    options, sep, command = args.partition("CMD ")
    if not sep:
        raise ValueError(f"HEALTHCHECK {args!r} has no CMD")
    parsed = dict(opt.removeprefix("--").split("=", 1) for opt in options.split())
    value = json.loads(command)
    if not isinstance(value, list):
        raise ValueError(f"HEALTHCHECK CMD {command!r} is not the exec (JSON array) form")
    return parsed, value


# -- .dockerignore ----------------------------------------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
            continue
        if pattern.startswith("**", i):
            out += ".*"
            i += 2
            continue
        if char == "*":
            out += "[^/]*"
        elif char == "?":
            out += "[^/]"
        elif char == "[":
            end = pattern.index("]", i)
            out += "[" + pattern[i + 1 : end].replace("!", "^", 1) + "]"
            i = end
        else:
            out += re.escape(char)
        i += 1
    return re.compile(out + r"\Z")


class DockerIgnore:
    """Docker's rules: patterns in order, the last match wins, ``!`` re-includes; a pattern
    that matches a parent directory matches everything under it."""

    def __init__(self, path: Path = DOCKERIGNORE) -> None:
        self.rules: list[tuple[bool, re.Pattern[str]]] = []
        for raw in path.read_text().splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            negate = line.startswith("!")
            pattern = line[1:].strip() if negate else line
            pattern = pattern.strip("/").removeprefix("./")
            self.rules.append((negate, _pattern_regex(pattern)))

    def excluded(self, relative: str) -> bool:
        parts = relative.strip("/").split("/")
        candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        excluded = False
        for negate, regex in self.rules:
            if any(regex.match(c) for c in candidates):
                excluded = not negate
        return excluded


def copy_context(sources: list[str], dest: Path, root: Path = REPO_ROOT) -> list[str]:
    """Copy ``sources`` (files or directories of the build context) into ``dest`` as
    ``COPY`` would see them: only what .dockerignore lets into the context. Returns the
    relative paths copied."""
    ignore = DockerIgnore()
    copied: list[str] = []
    for source in sources:
        path = root / source
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for file in files:
            relative = file.relative_to(root).as_posix()
            if ignore.excluded(relative):
                continue
            target = dest / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(file.read_bytes())
            copied.append(relative)
    return copied
