"""The Lua scripts run on Redis, kept as ``.lua`` files beside the code that runs them.

A package's scripts live in its ``lua/`` directory (``storage/lua/*.lua`` here, the limiter's
in ``chatserver/limits/lua/``, named by the package ``chatserver.limits``); each module reads
the scripts it needs once, when it is imported.
Every script runs after one shared prelude (``prelude.lua``: ``now_ms()``, Redis' clock), so
no script carries its own copy of a helper.

Some scripts are pieces: a line ``--NAME--`` (a Lua comment, so the file is valid as it is)
marks where :func:`splice` puts another piece. The window's append takes a gate there
(``window_gate.lua`` around a gate's body) and a follow (``window_follow.lua`` around a
follow's body), and a gate's body also runs on its own inside ``gate_alone.lua``.
"""

from __future__ import annotations

import functools
from importlib import resources

PACKAGE = "storage"


@functools.cache
def source(name: str, package: str = PACKAGE) -> str:
    """The text of ``lua/<name>.lua`` in ``package``, without the prelude."""
    return resources.files(package).joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")


def splice(text: str, **pieces: str) -> str:
    """``text`` with the line ``--NAME--`` replaced by each piece given as ``NAME=``."""
    for name, piece in pieces.items():
        marker = f"--{name}--"
        if text.count(marker) != 1:
            raise ValueError(f"not one {marker} line to splice at")
        text = text.replace(marker, piece)
    return text


def script(name: str, package: str = PACKAGE, **pieces: str) -> str:
    """A whole script: the prelude, then ``<name>.lua`` with ``pieces`` spliced in."""
    return f"{source('prelude')}\n{splice(source(name, package), **pieces)}"


def gate_alone(body: str) -> str:
    """A gate's body (a function of K, A and V) as a script of its own keys and args."""
    return script("gate_alone", BODY=body)


def gated(name: str, body: str, package: str = PACKAGE) -> str:
    """Script ``name`` with a gate's body spliced in at its ``--GATE--`` line."""
    return script(name, package, GATE=splice(source("window_gate"), BODY=body))


def composed(name: str, gate: str | None, follow: str | None, package: str = PACKAGE) -> str:
    """Script ``name`` with a gate's body at its ``--GATE--`` line and a follow's body at its
    ``--FOLLOW--`` line (each left a comment when None)."""
    pieces = {}
    if gate is not None:
        pieces["GATE"] = splice(source("window_gate"), BODY=gate)
    if follow is not None:
        pieces["FOLLOW"] = splice(source("window_follow"), BODY=follow)
    return script(name, package, **pieces)
