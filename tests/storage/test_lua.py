"""Every Lua script of the packages: it loads on a real Redis, and it shares the one prelude.

What each script does is tested by the conformance suites of the code that runs it (window,
outbox, limits); here, that every ``.lua`` file is well-formed Lua with the prelude in front,
and that no script keeps its own copy of what the prelude holds.
"""

from __future__ import annotations

import ast
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from storage import lua
from storage.redis_codec import fast_timestamp

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("protocol", "storage", "chatserver", "chatclient", "chatload")
LUA_FILES = sorted(p for package in PACKAGES for p in (ROOT / package).rglob("lua/*.lua"))
# Bodies of a function of K and A (gates), runnable on their own inside gate_alone.lua.
GATE_BODIES = {"send_check"}
# Lua still held in Python strings (none: every script is a .lua file).
INLINE_LUA_ALLOWED: set[str] = set()


def _package(path: Path) -> str:
    """The package whose ``lua/`` directory holds ``path`` (the loader's ``package=``)."""
    return ".".join(path.parent.parent.relative_to(ROOT).parts)


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


def test_the_scripts_are_found() -> None:
    names = {p.stem for p in LUA_FILES}
    assert {"prelude", "window_append", "outbox_add", "open", "send_check"} <= names


@pytest.mark.parametrize("path", LUA_FILES, ids=lambda p: str(p.relative_to(ROOT)))
async def test_every_script_loads_with_the_prelude(redis: Redis, path: Path) -> None:
    if path.stem == "prelude":
        text = lua.source("prelude")
    elif path.stem in GATE_BODIES:
        text = lua.gate_alone(lua.source(path.stem, _package(path)))
    else:
        text = lua.script(path.stem, _package(path))
    # SCRIPT LOAD compiles without running: a syntax error fails here.
    assert len(await redis.script_load(text)) == 40


async def test_a_gate_spliced_into_the_append_loads(redis: Redis) -> None:
    body = lua.source("send_check", "chatserver.limits")
    text = lua.gated("window_append", body)
    assert "--GATE--" not in text and "--BODY--" not in text
    assert len(await redis.script_load(text)) == 40


def test_splice_refuses_a_missing_marker() -> None:
    with pytest.raises(ValueError, match="not one --NOPE--"):
        lua.splice("return 1", NOPE="x")


def test_only_the_prelude_reads_the_clock() -> None:
    readers = [p.name for p in LUA_FILES if "redis.call('TIME')" in p.read_text()]
    assert readers == ["prelude.lua"]
    # One prelude in front of each whole script, never two (a splice adds none).
    gated = lua.gated("window_append", lua.source("send_check", "chatserver.limits"))
    assert gated.count("local function now_ms") == 1


def test_no_lua_in_python_strings() -> None:
    """Scripts live in .lua files: a Python string that calls Redis from Lua is a copy."""
    found = []
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            rel = str(path.relative_to(ROOT))
            if rel in INLINE_LUA_ALLOWED:
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                text = node.value if isinstance(node, ast.Constant) else None
                if isinstance(text, str) and "redis.call(" in text:
                    found.append(rel)
    assert found == []


@pytest.mark.parametrize(
    "ms",
    [
        0,
        951_782_400_000,  # 2000-02-29
        951_868_799_999,  # 2000-02-29T23:59:59.999
        4_107_542_400_000,  # 2100-03-01 (2100 is not a leap year)
        1_796_528_112_264,
        1_798_761_599_999,  # 2026-12-31T23:59:59.999
        253_402_300_799_999,  # 9999-12-31T23:59:59.999
    ],
)
async def test_iso_ms_writes_times_as_the_window_reads_them(redis: Redis, ms: int) -> None:
    """The append script stamps a fanned-out message's created_at with it: the same text a
    read of the window gives that message."""
    text = lua.source("prelude") + "\nreturn iso_ms(tonumber(ARGV[1]))"
    assert (await redis.eval(text, 0, ms)).decode() == fast_timestamp(ms)
