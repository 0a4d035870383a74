"""Caps on WebSockets that have not authenticated yet: per instance and per client address.

Until a socket authenticates it is outside every per-user cap, so without these a single
address could hold any number of them (each for up to ``auth_timeout_s``). Past a cap the
upgrade is refused with HTTP 429 before any WebSocket state is made.

Behind a proxy every socket comes from the proxy's address: then the per-address cap would
count all clients together. When the peer is one of ``trusted_proxies``, the client address
is the right-most ``X-Forwarded-For`` entry that is not itself a trusted proxy (the entries to
its left are whatever the client sent, so they are never believed).
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from ..settings.sections import WsSettings


class Admission:
    """Counts the sockets between the upgrade request and the end of authentication."""

    __slots__ = ("_by_address", "_per_address", "_proxies", "_total", "pending")

    def __init__(self, total: int, per_address: int, proxies: frozenset[str]) -> None:
        self._total = total
        self._per_address = per_address
        self._proxies = proxies
        self._by_address: dict[str, int] = {}
        self.pending = 0

    @classmethod
    def of(cls, ws: WsSettings) -> Admission:
        return cls(ws.max_pending_auth, ws.max_pending_auth_per_address, ws.proxies)

    def client_address(self, request: web.BaseRequest) -> str:
        peer = request.remote or ""
        if peer not in self._proxies:
            return peer
        hops = [h.strip() for h in request.headers.get("X-Forwarded-For", "").split(",")]
        for hop in reversed(hops):
            if hop and hop not in self._proxies:
                return hop
        return peer

    def admit_request(
        self, request: web.BaseRequest
    ) -> tuple[web.Response | None, Callable[[], None]]:
        """(an HTTP 429 to answer, or None, release): release once authentication is over."""
        refusal, release = self.admit(self.client_address(request))
        if refusal is None:
            return None, release
        body = {"error": {"code": "rate_limited", "message": refusal}}
        return web.json_response(body, status=429, headers={"Retry-After": "1"}), release

    def admit(self, address: str) -> tuple[str | None, Callable[[], None]]:
        """(refusal message or None, release): call release once authentication is over."""
        if self.pending >= self._total:
            return f"at most {self._total} unauthenticated connections per instance", _noop
        held = self._by_address.get(address, 0)
        if held >= self._per_address:
            return f"at most {self._per_address} unauthenticated connections per address", _noop
        self.pending += 1
        self._by_address[address] = held + 1
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            self.pending -= 1
            left = self._by_address[address] - 1
            if left:
                self._by_address[address] = left
            else:
                del self._by_address[address]

        return None, release


def _noop() -> None:
    pass
