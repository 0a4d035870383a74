"""The WebSocket gateway at /ws: negotiation, auth, the read loop and frame dispatch."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from aiohttp import WSMsgType, web
from redis.exceptions import RedisError

from protocol import (
    Auth,
    CloseCode,
    Encoding,
    ErrorCode,
    ErrorFrame,
    Hello,
    ProtocolError,
    Reconnect,
    decode_client_frame,
    negotiate,
)

from .. import keys
from ..auth import AuthError, Principal, bearer_token
from ..errors import DEPENDENCY_ERRORS, ServiceError, is_dependency_failure
from ..fanout.events import framed
from ..fanout.outbound import Outbound
from ..fanout.session import Session
from .commands import dispatch
from .handshake import authenticated, bound_kernel_buffer, offered_subprotocols

log = logging.getLogger("chatserver.gateway")

# After a close we give a client this long to read its last frames, then drop the socket.
_ABORT_AFTER_CLOSE_S = 10.0
_CLOSE_WAIT_S = 6.0  # the WebSocketResponse close timeout (5 s) and a margin
_CLOSED_TYPES = (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR)


async def websocket_handler(request: web.Request) -> web.StreamResponse:
    app = request.app
    if app[keys.STATE].draining:
        return web.json_response(
            {"error": {"code": "unavailable", "message": "server is draining"}}, status=503
        )
    # Only its outcome is kept: this frame lives as long as the socket.
    offered = bool(subprotocols := offered_subprotocols(request))
    encoding = negotiate(subprotocols)
    del subprotocols
    if encoding is None:
        return web.Response(
            status=400,
            text="unsupported WebSocket subprotocol: offer chat.v1.json or chat.v1.msgpack\n",
        )
    refused, release = app[keys.ADMISSION].admit_request(request)
    if refused is not None:
        return refused
    unauthenticated = [release]  # released when authentication ends, not kept to the end
    del release
    try:
        return await _serve_socket(request, encoding, offered, unauthenticated)
    finally:
        authenticated(unauthenticated)  # if it never ended (the upgrade failed, say)


async def _serve_socket(
    request: web.Request,
    encoding: Encoding,
    offered: bool,
    unauthenticated: list[Callable[[], None]],
) -> web.StreamResponse:
    app = request.app
    settings = app[keys.SETTINGS]
    ws = web.WebSocketResponse(
        protocols=(encoding.value,) if offered else (),
        heartbeat=settings.ws.heartbeat_s,
        # aiohttp refuses a message of max_msg_size bytes itself; the limit is inclusive
        max_msg_size=settings.ws.max_frame_bytes + 1,
        compress=False,  # one framed bytes object serves every recipient, uncompressed
        decode_text=False,  # we check UTF-8 ourselves: a bad frame is an error, not a close
        timeout=5.0,
    )
    await ws.prepare(request)
    transport = request.transport
    if transport is None:
        return ws
    bound_kernel_buffer(transport, settings.ws.tcp_send_buffer_bytes)
    connection = _Connection(app, ws, transport, encoding)
    connections = app[keys.STATE].connections
    connections.add(connection)
    try:
        try:  # two steps here, not a method awaiting both: one coroutine frame fewer
            principal = await connection.admit(request)
        finally:
            authenticated(unauthenticated)  # whatever the outcome
        if principal is not None:
            await connection.open(request, principal)
    finally:
        connections.discard(connection)
        await connection.finish()
        # aiohttp (3.14) keeps the upgraded protocol's callback into the WebSocketResponse
        # after the connection is lost: ws -> request -> protocol -> callback -> ws, a cycle
        # per connection that only a full collection frees (rare here: cli.py). The socket
        # is done: nothing needs the callback (it resets the heartbeat on incoming data).
        protocol = request.protocol
        if getattr(protocol, "_data_received_cb", None) is not None:
            protocol._data_received_cb = None
    return ws


class _Connection:
    """One WebSocket from handshake to close."""

    # Thousands of these stay open: no per-instance dict (see the connections benchmark).
    __slots__ = (
        "_close_task",
        "_closing",
        "app",
        "close_reason",
        "counted",
        "encoding",
        "limits",
        "metrics",
        "outbound",
        "session",
        "settings",
        "transport",
        "ws",
    )

    def __init__(
        self,
        app: web.Application,
        ws: web.WebSocketResponse,
        transport: asyncio.Transport,
        encoding: Encoding,
    ) -> None:
        self.app = app
        self.ws = ws
        self.transport = transport
        self.encoding = encoding
        self.settings = app[keys.SETTINGS]
        self.metrics = app[keys.METRICS]
        self.limits = app[keys.LIMITS]
        self.session: Session | None = None
        self.close_reason = "client"
        self._closing = False
        self._close_task: asyncio.Task[bool] | None = None
        self.counted = False  # the session holds one of its user's connection slots
        self.outbound = Outbound(
            transport, app[keys.FLUSHER], self.settings.ws.send_buffer_bytes, self
        )

    # -- sending and closing ------------------------------------------------------------

    def send_error(
        self,
        code: ErrorCode,
        message: str,
        ref: str | None = None,
        retry_after_ms: int | None = None,
    ) -> None:
        self.metrics.errors.labels(code.value).inc()
        if code in (ErrorCode.RATE_LIMITED, ErrorCode.QUOTA_EXCEEDED):
            self.metrics.rate_limited.labels(code.value).inc()
        frame = ErrorFrame(code.value, message, retry_after_ms, ref).to_dict()
        self.outbound.push(framed(frame, self.encoding))

    def close(self, code: int, reason: str) -> None:
        if self._closing:
            return
        self._closing = True
        self.close_reason = reason
        self.outbound.stop()
        self._close_task = asyncio.get_running_loop().create_task(
            self.ws.close(code=code, message=reason.encode()[:120], drain=False)
        )

    def going_away(self, after_ms: int, reason: str = "server draining") -> None:
        if self.session is not None and not self._closing:
            self._send(Reconnect(reason, after_ms))
        self.close(CloseCode.GOING_AWAY, "server_draining")

    def on_overflow(self) -> None:
        self.metrics.slow_consumers.inc()
        session = self.session
        log.warning(
            "slow consumer closed",
            extra={
                "session": session.id if session else None,
                "user": session.user_id if session else None,
            },
        )
        self.close(CloseCode.SLOW_CONSUMER, "slow_consumer")

    # -- lifecycle ------------------------------------------------------------------------

    async def admit(self, request: web.Request) -> Principal | None:
        origins = self.settings.server.origins
        origin = request.headers.get("Origin")
        dev = self.app[keys.AUTH].dev_mode
        if origins and not dev and origin is not None and origin not in origins:
            self.send_error(ErrorCode.FORBIDDEN, "origin not allowed")
            self.close(CloseCode.FORBIDDEN, "forbidden_origin")
            return None
        return await self._authenticate(request)

    async def open(self, request: web.Request, principal: Principal) -> None:
        state = self.app[keys.STATE]
        session_id = str(uuid.uuid4())
        limits = self.settings.tier_limits(principal.tier)
        limiter = self.app[keys.LIMITER]
        try:
            opened = await limiter.open_connection(principal.user_id, session_id, limits)
        except Exception as exc:  # unreadable (Redis restarting, a cluster re-forming): refused
            if not isinstance(exc, RedisError) and not is_dependency_failure(exc):
                raise
            log.warning("connection refused: its limit could not be checked: %s", exc)
            self.send_error(
                ErrorCode.UNAVAILABLE,
                "the connection limit could not be checked, connect again shortly",
                retry_after_ms=1000,
            )
            self.close(CloseCode.TRY_AGAIN_LATER, "unavailable")
            return
        if not opened:
            self.send_error(
                ErrorCode.RATE_LIMITED, f"at most {limits.connections} connections per user"
            )
            self.close(CloseCode.TOO_MANY_CONNECTIONS, "too_many_connections")
            return
        self.session = Session(session_id, principal, self.encoding, self.outbound)
        self.counted = True
        self.app[keys.HUB].add_session(self.session)
        state.users[principal.user_id] = state.users.get(principal.user_id, 0) + 1
        self.metrics.active_users.set(len(state.users))
        self.metrics.connections.labels(self.encoding.name.lower()).inc()
        self.metrics.connects.labels(self.encoding.name.lower()).inc()
        log.info(
            "connection opened",
            extra={
                "session": self.session.id,
                "user": principal.user_id,
                "encoding": self.encoding.name.lower(),
                "remote": request.remote,
            },
        )
        self._send(
            Hello(
                self.session.id,
                principal.user_id,
                self.settings.server.server_id,
                self.settings.ws.heartbeat_s,
                self.settings.ws.max_frame_bytes,
            )
        )
        # The read loop, inline: one coroutine frame fewer per open connection.
        session = self.session
        ws = self.ws
        while not self._closing:
            msg = await ws.receive()
            kind = msg.type
            if kind is WSMsgType.TEXT or kind is WSMsgType.BINARY:
                await self._handle(session, msg.data, kind is WSMsgType.TEXT)
            elif kind in _CLOSED_TYPES:
                break

    async def finish(self) -> None:
        self.outbound.closed = True
        if self._close_task is not None:
            # The close frame must be written before the transport goes.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._close_task), _CLOSE_WAIT_S)
        if self.session is not None:
            session = self.session
            state = self.app[keys.STATE]
            await self.app[keys.HUB].remove_session(session)
            left = state.users.get(session.user_id, 1) - 1
            if left <= 0:
                state.users.pop(session.user_id, None)
            else:
                state.users[session.user_id] = left
            self.metrics.active_users.set(len(state.users))
            self.metrics.connections.labels(self.encoding.name.lower()).dec()
        if self.counted and self.session is not None:
            # The user's connection slot is free again (with Redis, for every instance).
            with contextlib.suppress(*DEPENDENCY_ERRORS):
                await self.app[keys.LIMITER].close_connection(self.session.user_id, self.session.id)
        reason = self._disconnect_reason()
        self.metrics.disconnects.labels(reason).inc()
        if self.session is not None:
            log.info(
                "connection closed",
                extra={"session": self.session.id, "user": self.session.user_id, "reason": reason},
            )
        if not self.transport.is_closing():
            self.transport.close()
        # A peer that never reads keeps a closed transport's buffer alive: drop it later.
        asyncio.get_running_loop().call_later(_ABORT_AFTER_CLOSE_S, self.transport.abort)
        self.outbound.detach()  # it holds us as its owner: no cycle left behind

    def _disconnect_reason(self) -> str:
        if self._closing:
            return self.close_reason
        code = self.ws.close_code
        if code == CloseCode.MESSAGE_TOO_BIG:
            return "too_large"
        return "client"

    async def _authenticate(self, request: web.Request) -> Principal | None:
        auth = self.app[keys.AUTH]
        token = bearer_token(request.headers.get("Authorization")) or request.query.get("token")
        ref = None
        if token is None:
            try:
                # One deadline for the whole wait: receive's own timeout restarts on every
                # control frame, so a client pinging every few seconds would never meet it.
                async with asyncio.timeout(self.settings.ws.auth_timeout_s):
                    msg = await self.ws.receive()
            except TimeoutError:
                self.send_error(ErrorCode.UNAUTHORIZED, "no auth frame in time")
                self.close(CloseCode.UNAUTHORIZED, "auth_timeout")
                return None
            if msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                return None
            try:
                frame = decode_client_frame(
                    msg.data, self.encoding, self.limits, text=msg.type is WSMsgType.TEXT
                )
            except ProtocolError as exc:
                self.send_error(
                    ErrorCode.UNAUTHORIZED, f"expected an auth frame: {exc.message}", exc.ref
                )
                self.close(CloseCode.UNAUTHORIZED, "unauthorized")
                return None
            if not isinstance(frame, Auth):
                self.send_error(ErrorCode.UNAUTHORIZED, "the first frame must be auth", frame.ref)
                self.close(CloseCode.UNAUTHORIZED, "unauthorized")
                return None
            token, ref = frame.token, frame.ref
        try:
            return auth.verify(token)
        except AuthError as exc:
            self.send_error(ErrorCode.UNAUTHORIZED, str(exc), ref)
            self.close(CloseCode.UNAUTHORIZED, "unauthorized")
            return None

    def _send(self, frame: Any) -> None:
        self.metrics.child(self.metrics.frames_out, frame.TYPE).inc()
        if self.session is not None:
            self.session.send(frame)

    async def _handle(self, session: Session, data: str | bytes, text: bool) -> None:
        try:
            frame = decode_client_frame(data, self.encoding, self.limits, text=text)
        except ProtocolError as exc:
            self.metrics.frames_in.labels("invalid").inc()
            self.send_error(exc.code, exc.message, exc.ref)
            if session.note_bad_frame(self.settings.ws.bad_frame_limit):
                self.close(CloseCode.POLICY_VIOLATION, "too_many_bad_frames")
            return
        self.metrics.child(self.metrics.frames_in, frame.TYPE).inc()
        wait_ms = session.take_frame(self.settings.ws.frames_per_second)
        if wait_ms is not None:
            self.send_error(ErrorCode.RATE_LIMITED, "too many frames", frame.ref, wait_ms)
            if session.note_bad_frame(self.settings.ws.bad_frame_limit):
                self.close(CloseCode.POLICY_VIOLATION, "frame_flood")
            return
        started = time.perf_counter()
        try:
            await dispatch(self.app, session, frame, self._send)
        except ServiceError as exc:
            self.send_error(exc.code, exc.message, frame.ref, exc.retry_after_ms)
        except Exception as exc:
            if is_dependency_failure(exc):
                log.warning("dependency unavailable: %s", exc, extra={"session": session.id})
                self.send_error(ErrorCode.UNAVAILABLE, "temporarily unavailable", frame.ref, 1000)
            else:
                log.exception("frame handling failed", extra={"session": session.id})
                self.send_error(ErrorCode.INTERNAL, "internal error", frame.ref)
        finally:
            self.metrics.child(self.metrics.frame_duration, frame.TYPE).observe(
                time.perf_counter() - started
            )
