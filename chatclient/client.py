"""A small async client of protocol v1, used by the tests and the load generator."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aiohttp

from protocol import (
    DEFAULT_LIMITS,
    Ack,
    Auth,
    Cancel,
    ClientFrame,
    Delta,
    Encoding,
    ErrorFrame,
    GenEnd,
    GenStart,
    Hello,
    History,
    HistoryPage,
    Join,
    Joined,
    Leave,
    Left,
    Ping,
    Pong,
    Send,
    ServerFrame,
    Since,
    Typing,
    decode_server_frame,
    encode_frame,
)

F = TypeVar("F", bound=ServerFrame)
T = TypeVar("T")


class ChatError(Exception):
    """The server answered a frame with an ``error`` frame."""

    def __init__(self, frame: ErrorFrame) -> None:
        super().__init__(f"{frame.code}: {frame.message}")
        self.frame = frame
        self.code = frame.code


class Closed(Exception):
    """The connection closed while a frame was awaited."""

    def __init__(self, code: int | None) -> None:
        super().__init__(f"connection closed with code {code}")
        self.code = code


class Reply:
    """One agent reply as a client saw it."""

    def __init__(self, start: GenStart | None, generation_id: str) -> None:
        self.start = start
        self.generation_id = generation_id
        self.deltas: list[Delta] = []
        self.end: GenEnd | None = None

    @property
    def text(self) -> str:
        return "".join(d.text for d in self.deltas)


class ChatClient:
    def __init__(
        self,
        http: aiohttp.ClientSession,
        ws: aiohttp.ClientWebSocketResponse,
        encoding: Encoding,
        owns_http: bool,
        max_buffered: int = 100_000,
    ) -> None:
        self.http = http
        self.ws = ws
        self.encoding = encoding
        self._owns_http = owns_http
        self._frames: asyncio.Queue[ServerFrame | None] = asyncio.Queue(max_buffered)
        self._backlog: list[ServerFrame] = []
        self.hello: Hello | None = None
        self.close_code: int | None = None
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def connect(
        cls,
        url: str,
        token: str,
        *,
        encoding: Encoding = Encoding.JSON,
        auth: str = "header",
        http: aiohttp.ClientSession | None = None,
        timeout: float = 10.0,
    ) -> ChatClient:
        """Open ``url`` (ws://host:port/ws), authenticate ('header' | 'frame' | 'query')."""
        owns = http is None
        session = http or aiohttp.ClientSession()
        headers = {"Authorization": f"Bearer {token}"} if auth == "header" else {}
        params = {"token": token} if auth == "query" else None
        try:
            ws = await session.ws_connect(
                url,
                protocols=(encoding.value,),
                headers=headers,
                params=params,
                max_msg_size=0,
                autoping=True,
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=timeout),
            )
        except BaseException:
            if owns:
                await session.close()
            raise
        client = cls(session, ws, encoding, owns)
        try:
            if auth == "frame":
                await client.send_frame(Auth(token))
            client.hello = await client.expect(Hello, timeout=timeout)
        except BaseException:
            await client.close()
            raise
        return client

    async def _read(self) -> None:
        try:
            async for msg in self.ws:
                if msg.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                    frame = decode_server_frame(msg.data, self.encoding, _UNBOUNDED)
                    await self._frames.put(frame)
        finally:
            self.close_code = self.ws.close_code
            with contextlib.suppress(asyncio.QueueFull):
                self._frames.put_nowait(None)

    async def send_frame(self, frame: ClientFrame) -> None:
        data = encode_frame(frame, self.encoding)
        if self.encoding is Encoding.JSON:
            await self.ws.send_str(data.decode())
        else:
            await self.ws.send_bytes(data)

    async def send_raw(self, data: str | bytes) -> None:
        if isinstance(data, str):
            await self.ws.send_str(data)
        else:
            await self.ws.send_bytes(data)

    async def next_frame(self, timeout: float = 5.0) -> ServerFrame:
        if self._backlog:
            return self._backlog.pop(0)
        return await self._take(timeout)

    async def _take(self, timeout: float) -> ServerFrame:
        frame = await asyncio.wait_for(self._frames.get(), timeout)
        if frame is None:
            self._frames.put_nowait(None)  # stay closed for later callers
            raise Closed(self.close_code)
        return frame

    async def expect(
        self,
        kind: type[F],
        predicate: Callable[[F], bool] | None = None,
        *,
        timeout: float = 5.0,
        errors: bool = True,
    ) -> F:
        """The next frame of ``kind`` (matching ``predicate``); others are kept for later.

        An ``error`` frame arriving first raises ``ChatError`` when ``errors`` is true.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        for index, frame in enumerate(self._backlog):
            if isinstance(frame, kind) and (predicate is None or predicate(frame)):
                del self._backlog[index]
                return frame
            if errors and isinstance(frame, ErrorFrame) and kind is not ErrorFrame:
                del self._backlog[index]
                raise ChatError(frame)
        while True:
            frame = await self._take(max(0.0, deadline - loop.time()))
            if isinstance(frame, kind) and (predicate is None or predicate(frame)):
                return frame
            if errors and isinstance(frame, ErrorFrame) and kind is not ErrorFrame:
                raise ChatError(frame)
            self._backlog.append(frame)

    def pending(self) -> list[ServerFrame]:
        """Frames received but not yet taken (for assertions)."""
        while not self._frames.empty():
            frame = self._frames.get_nowait()
            if frame is None:
                self._frames.put_nowait(None)
                break
            self._backlog.append(frame)
        return list(self._backlog)

    # -- requests ----------------------------------------------------------------------

    async def join(self, conversation_id: str, since: Since | None = None) -> Joined:
        ref = _ref()
        await self.send_frame(Join(conversation_id, since, ref))
        return await self.expect(Joined, lambda f: f.ref == ref)

    async def leave(self, conversation_id: str) -> Left:
        ref = _ref()
        await self.send_frame(Leave(conversation_id, ref))
        return await self.expect(Left, lambda f: f.ref == ref)

    async def send(self, conversation_id: str, text: str, client_msg_id: str | None = None) -> Ack:
        ref = _ref()
        await self.send_frame(Send(conversation_id, client_msg_id or _ref(), text, ref))
        return await self.expect(Ack, lambda f: f.ref == ref)

    async def send_reliably(
        self,
        conversation_id: str,
        text: str,
        client_msg_id: str | None = None,
        *,
        attempts: int = 10,
    ) -> Ack:
        """Send, retrying `unavailable` and `rate_limited` answers after their delay.

        The same ``client_msg_id`` goes with every attempt, so a retry of a message that
        was in fact accepted returns its first ack (``duplicate: true``), never a copy.
        """
        client_msg_id = client_msg_id or _ref()
        return await _retrying(
            lambda: self.send(conversation_id, text, client_msg_id),
            ("unavailable", "rate_limited"),
            attempts,
        )

    async def join_reliably(
        self, conversation_id: str, since: Since | None = None, *, attempts: int = 10
    ) -> Joined:
        """Join, retrying an `unavailable` answer (Redis or the store coming back) after
        its delay, as the protocol asks of a client."""
        return await _retrying(
            lambda: self.join(conversation_id, since), ("unavailable",), attempts
        )

    async def history(
        self, conversation_id: str, before: int | None = None, limit: int | None = None
    ) -> HistoryPage:
        ref = _ref()
        await self.send_frame(History(conversation_id, before, limit, ref))
        return await self.expect(HistoryPage, lambda f: f.ref == ref)

    async def ping(self, ts: int | float | str | None = None) -> Pong:
        ref = _ref()
        await self.send_frame(Ping(ts, ref))
        return await self.expect(Pong, lambda f: f.ref == ref)

    async def typing(self, conversation_id: str) -> None:
        await self.send_frame(Typing(conversation_id))

    async def cancel(self, generation_id: str) -> None:
        await self.send_frame(Cancel(generation_id))

    async def reply(self, reply_to: str | None = None, timeout: float = 30.0) -> Reply:
        """Collect one whole reply (gen_start, deltas, gen_end) to ``reply_to``."""
        start = await self.expect(
            GenStart, lambda f: reply_to is None or f.reply_to == reply_to, timeout=timeout
        )
        return await self.follow(start.generation_id, start, timeout=timeout)

    async def follow(
        self, generation_id: str, start: GenStart | None = None, timeout: float = 30.0
    ) -> Reply:
        reply = Reply(start, generation_id)
        while True:
            frame = await self.expect(
                Delta | GenEnd,  # type: ignore[arg-type]
                lambda f: f.generation_id == generation_id,
                timeout=timeout,
            )
            if isinstance(frame, GenEnd):
                reply.end = frame
                return reply
            reply.deltas.append(frame)

    async def close(self) -> None:
        await self.ws.close()
        await cancel_and_wait(self._reader)
        if self._owns_http:
            await self.http.close()

    async def __aenter__(self) -> ChatClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class ChatApi:
    """The REST side of the contract."""

    def __init__(self, base_url: str, token: str | None, http: aiohttp.ClientSession) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.http = http

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    async def request(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        async with self.http.request(
            method, self.base_url + path, headers=self._headers(), **kwargs
        ) as resp:
            body = await resp.json(content_type=None)
            return resp.status, body

    async def dev_token(self, user_id: str, tier: str = "free") -> str:
        status, body = await self.request(
            "POST", "/api/dev/token", json={"user_id": user_id, "tier": tier}
        )
        if status != 200:
            raise RuntimeError(f"dev token refused: {status} {body}")
        return str(body["token"])

    async def create_conversation(
        self, agent_id: str = "general", title: str | None = None, members: list[str] | None = None
    ) -> dict[str, Any]:
        payload: dict[str, Any] = {"agent_id": agent_id}
        if title is not None:
            payload["title"] = title
        if members:
            payload["members"] = members
        status, body = await self.request("POST", "/api/conversations", json=payload)
        if status != 201:
            raise RuntimeError(f"create conversation failed: {status} {body}")
        return dict(body)


async def _retrying(
    request: Callable[[], Awaitable[T]], codes: tuple[str, ...], attempts: int
) -> T:
    """``request``'s answer, asked again after ``retry_after_ms`` (else 500 ms) while it is
    an error whose code is one of ``codes``, at most ``attempts`` times in all."""
    for attempt in range(attempts):
        try:
            return await request()
        except ChatError as exc:
            if exc.code not in codes or attempt == attempts - 1:
                raise
            await asyncio.sleep((exc.frame.retry_after_ms or 500) / 1000)
    raise AssertionError("unreachable")


def _ref() -> str:
    return uuid.uuid4().hex


_UNBOUNDED = DEFAULT_LIMITS.__class__(
    max_frame_bytes=1 << 30,
    max_text_chars=1 << 30,
    max_members=1 << 20,
    history_max_limit=1 << 20,
    max_object_keys=1 << 10,
)


async def cancel_and_wait(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` and wait for its end, whatever it raised. A cancellation of the
    caller itself still goes through: suppressing ``CancelledError`` around the wait would
    swallow it, and a caller cancelled in a loop would never stop."""
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise
    except Exception:
        pass
