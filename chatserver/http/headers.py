"""Headers every response carries: no version banner, and the browser protections.

The page loads only its own script, style and WebSocket (no inline code), so a strict
Content-Security-Policy costs it nothing and stops injected markup from running anything.
"""

from __future__ import annotations

from aiohttp import web

# The page's WebSocket is same-origin; CSP's 'self' does not cover ws:/wss: in every browser.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self' ws: wss:; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
SERVER = "chatserver"  # aiohttp would name itself and the Python version


async def security_headers(request: web.Request, response: web.StreamResponse) -> None:
    headers = response.headers
    headers["Server"] = SERVER
    if request.path == "/ws":
        # A 101 with no body to sniff: one header less held for the socket's whole life.
        return
    headers["X-Content-Type-Options"] = "nosniff"
    if not request.path.startswith(("/api/", "/metrics")):
        # The page and its static files.
        headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
        headers["X-Frame-Options"] = "DENY"
        headers["Referrer-Policy"] = "no-referrer"
