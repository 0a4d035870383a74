"""The reply buffer's Lua scripts, read once at import from the ``.lua`` files beside this.

Each script is the shared ``prelude.lua`` followed by its own file, so helpers (who owns a
reply) are written once. Loaded at start-up: a missing file fails the import, not a reply.
"""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent
_PRELUDE = (_HERE / "prelude.lua").read_text()


def script(name: str) -> str:
    """The source of ``<name>.lua`` behind the prelude."""
    return _PRELUDE + "\n" + (_HERE / f"{name}.lua").read_text()
