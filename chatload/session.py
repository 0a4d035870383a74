"""One simulated client, and how it gets connected: token, upgrade, hello, conversation, join."""

from __future__ import annotations

import asyncio
import functools
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .accounting import Receiver
from .dialects import Frame
from .receive import CountingProtocol
from .wsclient import OP_TEXT, HandshakeError, WsProtocol, open_ws

if TYPE_CHECKING:
    import aiohttp

    from chatserver.auth import Authenticator

    from .worker import Worker

_ATTEMPTS = 3


class SetupError(RuntimeError):
    """The server refused a step of getting a client going (token, conversation, join)."""


class Client:
    __slots__ = (
        "asked",
        "busy",
        "closed",
        "conv",
        "conv_id",
        "gens",
        "index",
        "inflight",
        "owed",
        "proto",
        "ready",
        "receiver",
        "sender",
        "seq",
        "task",
        "token",
        "turn",
        "url_index",
        "waiters",
        "worker",
    )

    def __init__(self, worker: Worker, index: int) -> None:
        config = worker.config
        self.worker = worker
        self.index = index
        self.conv = index // config.members  # the logical conversation
        self.sender = index % config.members < config.senders_per_conversation
        self.url_index = (index // config.procs) % len(config.urls)
        self.conv_id: str | None = None
        self.proto: WsProtocol | None = None
        self.token: str | None = None
        self.receiver = Receiver()
        self.seq = 0
        self.inflight = 0
        self.owed = 0  # sent and not refused: deliveries the members are owed (flow.py)
        self.turn = 0
        self.busy = False
        self.closed = True
        self.ready = False
        self.asked: dict[str, int] = {}  # message id -> send time (ai: TTFT)
        self.gens: dict[str, list[int]] = {}  # generation -> [asked at, last seq, last at]
        self.waiters: dict[str, asyncio.Future[Frame]] = {}
        self.task: asyncio.Task[None] | None = None

    def resolve(self, kind: str, frame: Frame) -> bool:
        key = "hello" if kind == "hello" else str(frame.get("ref"))
        waiter = self.waiters.pop(key, None)
        if waiter is None or waiter.done():
            return False
        waiter.set_result(frame)
        return True

    def proto_send(self, opcode: int, data: bytes) -> bool:
        return self.proto is not None and self.proto.send(opcode, data)

    def send_frame(self, frame: Frame) -> bool:
        opcode, data = self.worker.dialect.encode(frame)
        return self.proto_send(opcode, data)

    def send_raw(self, text: str) -> None:
        self.proto_send(OP_TEXT, text.encode())

    async def request(self, frame: Frame, ref: str, timeout: float) -> Frame:
        waiter: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self.waiters[ref] = waiter
        try:
            if not self.send_frame({**frame, "ref": ref}):
                raise SetupError("connection closed")
            return await asyncio.wait_for(waiter, timeout)
        finally:
            self.waiters.pop(ref, None)

    def close(self) -> None:
        if self.proto is not None:
            self.proto.close()


class Setup:
    """Tokens, conversations and joins for one worker's clients."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.config = config = worker.config
        self._http: aiohttp.ClientSession | None = None
        self._auth: Authenticator | None = None
        if config.jwt_secret and config.dialect == "chatserver":
            from chatserver.auth import Authenticator

            self._auth = Authenticator(config.jwt_secret)
        self._members: list[list[str]] | None = None
        if config.conversations_file:
            data = json.loads(Path(config.conversations_file).read_text())
            self._members = [list(item["members"]) for item in data]
        self._joins = 0

    def user_of(self, client: Client) -> str:
        if self._members is not None:
            return self._members[client.conv][client.index % self.config.members]
        return self.config.user_id(client.index)

    async def http(self) -> aiohttp.ClientSession:
        if self._http is None:
            import aiohttp

            self._http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64))
        return self._http

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()

    async def token(self, client: Client) -> str | None:
        if self.config.dialect != "chatserver":
            return None
        if client.token is None:
            user = self.user_of(client)
            if self._auth is not None:
                client.token = self._auth.issue(user, self.config.tier, ttl_s=6 * 3600)
            else:
                base = self.worker.bases[client.url_index]
                http = await self.http()
                async with http.post(
                    f"{base}/api/dev/token", json={"user_id": user, "tier": self.config.tier}
                ) as response:
                    body = await response.json(content_type=None)
                    if response.status != 200:
                        raise SetupError(f"dev token refused: {response.status} {body}")
                    client.token = str(body["token"])
        return client.token

    async def connect(self, client: Client, gate: asyncio.Semaphore) -> None:
        worker = self.worker
        last: BaseException | None = None
        for attempt in range(_ATTEMPTS):
            async with gate:
                try:
                    await self._connect_once(client)
                    worker.counts["connected"] += 1
                    return
                except (OSError, HandshakeError, TimeoutError, SetupError, ValueError) as exc:
                    last = exc
                    client.close()
            worker.counts["connect_retries"] += 1
            await asyncio.sleep(0.25 * (attempt + 1))
        worker.counts["connect_failed"] += 1
        if len(worker.errors) < 10:
            worker.errors.append(f"client {client.index}: connect failed: {last!r}")

    async def _connect_once(self, client: Client) -> None:
        worker = self.worker
        config = self.config
        token = await self.token(client)
        host, port = worker.hostports[client.url_index]
        loop = asyncio.get_running_loop()
        hello: asyncio.Future[Frame] = loop.create_future()
        client.waiters["hello"] = hello
        started = time.monotonic_ns()
        client.proto = await open_ws(
            host,
            port,
            worker.dialect.path,
            worker.dialect.headers(token),
            functools.partial(worker.on_payload, client),
            functools.partial(worker.on_close, client),
            config.connect_timeout_s,
            on_protocol=functools.partial(_bind, client),
            make=functools.partial(
                CountingProtocol,
                deliveries=worker.deliveries,
                receiver=client.receiver,
                conv=client.conv,
            ),
        )
        client.closed = False
        try:
            await asyncio.wait_for(hello, config.connect_timeout_s)
        except TimeoutError:
            raise SetupError(f"no hello (close code {client.proto.close_code})") from None
        worker.hist["connect"].record_us((time.monotonic_ns() - started) // 1000)
        if config.mode != "idle" and not config.turns:
            client.conv_id = await self.conversation_id(client)
            await self.join(client)
        if config.mode != "idle":
            worker.local_members[client.conv] += 1
        client.ready = True

    async def conversation_id(self, client: Client) -> str:
        if self.config.dialect != "chatserver":
            return f"c{client.conv}"
        if self.config.conversation_ids:
            return self.config.conversation_ids[client.conv]
        return await self.create_conversation(client)

    async def create_conversation(self, client: Client) -> str:
        base = self.worker.bases[client.url_index]
        http = await self.http()
        token = await self.token(client)
        started = time.monotonic_ns()
        async with http.post(
            f"{base}/api/conversations",
            json={"agent_id": self.config.agent_id},
            headers={"Authorization": f"Bearer {token}"},
        ) as response:
            body: Any = await response.json(content_type=None)
        self.worker.hist["rest"].record_us((time.monotonic_ns() - started) // 1000)
        if response.status != 201:
            raise SetupError(f"create conversation: {response.status} {body}")
        self.worker.counts["conversations_created"] += 1
        return str(body["id"])

    async def join(self, client: Client) -> None:
        assert client.conv_id is not None
        self._joins += 1
        started = time.monotonic_ns()
        frame = await client.request(
            {"type": "join", "conversation_id": client.conv_id},
            f"j{client.index}.{self._joins}",
            self.config.connect_timeout_s,
        )
        if frame.get("type") != "joined":
            raise SetupError(f"join refused: {frame.get('code')}: {frame.get('message')}")
        self.worker.hist["join"].record_us((time.monotonic_ns() - started) // 1000)

    async def open_conversation(self, client: Client) -> None:
        client.conv_id = await self.create_conversation(client)
        await self.join(client)


def _bind(client: Client, protocol: WsProtocol) -> None:
    client.proto = protocol
    client.closed = False
