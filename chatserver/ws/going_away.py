"""Sending every connected client elsewhere: a draining instance, or a broker that missed
events (the clients rejoin with ``since`` and recover what they missed)."""

from __future__ import annotations

import random

from aiohttp import web

from .. import keys


def drain_connections(app: web.Application, jitter_ms: int = 1000) -> None:
    """Tell every client to reconnect elsewhere (spread over ``jitter_ms``), close with 1001."""
    for connection in list(app[keys.STATE].connections):
        connection.going_away(random.randint(0, jitter_ms))


def resync_joined(app: web.Application, spread_ms: int = 1000) -> None:
    """The broker missed events: clients in conversations reconnect and rejoin with `since`.

    Reconnects are spread over ``spread_ms`` so they do not arrive all at once.
    """
    for connection in list(app[keys.STATE].connections):
        session = connection.session
        if session is not None and session.subscriptions:
            connection.going_away(random.randint(0, spread_ms), "event stream interrupted")
