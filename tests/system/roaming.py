"""A chat member that behaves like a well-written client behind a load balancer.

It connects to one URL (the load balancer), joins one conversation and sends messages one at a
time, waiting for the agent's reply to each. When the server says ``reconnect`` (or the
connection drops) it waits ``after_ms`` as told, connects again through the same URL, and rejoins
with ``since`` = the highest offset up to which it has seen every message, so the server sends
exactly what it missed. A send that was refused, or whose ack was lost with the connection, is
sent again with the same ``client_msg_id``: the server answers a repeat with the first ack.

It keeps every message it has seen by offset, which is what the tests check for gaps.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable

import aiohttp

from chatclient.client import ChatClient, ChatError, Closed, cancel_and_wait
from protocol import (
    Ack,
    Delta,
    ErrorFrame,
    GenEnd,
    GenStart,
    Joined,
    Message,
    MessageEvent,
    Reconnect,
    Send,
    ServerFrame,
    Since,
)

CONNECT_DEADLINE_S = 20.0


class Roaming:
    def __init__(self, url: str, token: str, conversation_id: str) -> None:
        self.url = url
        self.token = token
        self.conversation_id = conversation_id
        self.client: ChatClient | None = None
        self.connected = False
        self.epoch: str | None = None
        self.known: dict[int, Message] = {}  # every message seen, by offset
        self.replies: dict[str, Message] = {}  # user message id -> the agent's reply
        self.acked: dict[str, str] = {}  # client_msg_id -> message id
        self.servers: list[tuple[float, str]] = []  # (when, server_id) of each connection
        self.reconnects: list[Reconnect] = []
        self.rejoins: list[Joined] = []  # the answers to each join with `since`
        self.failed_connects: list[str] = []  # connection attempts that failed, and why
        self.conflicts: list[tuple[Message, Message]] = []  # two messages at one offset
        self.started: dict[str, GenStart] = {}  # reply_to -> gen_start
        self.delta_seq: dict[str, int] = {}  # generation_id -> last delta seq seen
        self._answers: dict[str, Ack | ErrorFrame] = {}
        self._pump: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        self._honoured = 0  # reconnect frames already waited for
        self._sending = False

    # -- what it has seen ---------------------------------------------------------------

    @property
    def server_id(self) -> str:
        return self.servers[-1][1]

    def contiguous(self) -> int:
        """The highest offset n such that messages 1..n have all been seen."""
        n = 0
        while n + 1 in self.known:
            n += 1
        return n

    def _keep(self, message: Message) -> None:
        seen = self.known.setdefault(message.offset, message)
        if seen.id != message.id:
            self.conflicts.append((seen, message))
        if message.role == "assistant" and message.reply_to is not None:
            self.replies[message.reply_to] = message

    def _record(self, frame: ServerFrame) -> None:
        if isinstance(frame, MessageEvent):
            self._keep(frame.message)
        elif isinstance(frame, GenEnd):
            if frame.message is not None:
                self._keep(frame.message)
        elif isinstance(frame, GenStart):
            self.started[frame.reply_to] = frame
        elif isinstance(frame, Delta):
            self.delta_seq[frame.generation_id] = frame.seq
        elif isinstance(frame, Reconnect):
            self.reconnects.append(frame)
        elif isinstance(frame, (Ack, ErrorFrame)) and frame.ref is not None:
            self._answers[frame.ref] = frame
        self._changed.set()

    async def until(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        """Wait for ``condition`` (re-checked on every frame and disconnect), with a deadline."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not condition():
            self._changed.clear()
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(f"{what}: not within {timeout} s")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    # -- connection ---------------------------------------------------------------------

    async def connect(self) -> None:
        """(Re)connect through the URL and join, with ``since`` once it has joined before."""
        if len(self.reconnects) > self._honoured:  # told to come back later: do as told
            after_ms = self.reconnects[-1].after_ms
            self._honoured = len(self.reconnects)
            await asyncio.sleep(after_ms / 1000)
        await self._drop()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CONNECT_DEADLINE_S
        while True:
            try:
                client = await ChatClient.connect(self.url, self.token)
                break
            except (aiohttp.ClientError, OSError, TimeoutError, ChatError, Closed) as exc:
                status = getattr(exc, "status", None)  # an HTTP answer instead of 101
                self.failed_connects.append(f"{type(exc).__name__} {status or exc}")
                if loop.time() > deadline:
                    raise
                await asyncio.sleep(0.1)
        assert client.hello is not None
        self.servers.append((time.monotonic(), client.hello.server_id))
        since = Since(self.contiguous(), self.epoch) if self.epoch is not None else None
        joined = await client.join(self.conversation_id, since)
        if since is not None:
            self.rejoins.append(joined)
        self.epoch = joined.epoch
        for message in joined.messages:
            self._keep(message)
        self.client = client
        self.connected = True
        self._pump = asyncio.create_task(self._read(client))

    async def _read(self, client: ChatClient) -> None:
        try:
            while True:
                self._record(await client.next_frame(timeout=3600))
        except Closed:
            pass
        finally:
            if self.client is client:
                self.connected = False
            self._changed.set()

    async def _drop(self) -> None:
        client, self.client, self.connected = self.client, None, False
        if self._pump is not None:
            await cancel_and_wait(self._pump)
            self._pump = None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.close()

    async def close(self) -> None:
        await self._drop()

    # -- traffic ------------------------------------------------------------------------

    async def send(self, text: str, client_msg_id: str, timeout: float = 60.0) -> Ack:
        """Send until acked (through reconnects), then wait for the agent's reply to it."""
        assert not self._sending, "one conversation flow per member: sends are sequential"
        self._sending = True
        try:
            return await self._send(text, client_msg_id, timeout)
        finally:
            self._sending = False

    async def _send(self, text: str, client_msg_id: str, timeout: float) -> Ack:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            assert loop.time() < deadline, f"{client_msg_id} not acked within {timeout} s"
            if not self.connected:
                await self.connect()
            assert self.client is not None
            ref = uuid.uuid4().hex
            try:
                await self.client.send_frame(Send(self.conversation_id, client_msg_id, text, ref))
            except (ConnectionError, aiohttp.ClientError):
                self.connected = False
                continue
            await self.until(
                lambda ref=ref: ref in self._answers or not self.connected,
                deadline - loop.time(),
                f"answer to {client_msg_id}",
            )
            answer = self._answers.pop(ref, None)
            if isinstance(answer, Ack):
                self.acked[client_msg_id] = answer.message_id
                break
            if isinstance(answer, ErrorFrame):
                # refused while the instance drains: it is about to send us elsewhere
                assert answer.code == "unavailable", f"{client_msg_id} refused: {answer}"
                await self.until(lambda: not self.connected, 30, "close after `unavailable`")
            # disconnected before the answer: send again, same client_msg_id
        message_id = answer.message_id
        while message_id not in self.replies:
            if not self.connected:
                await self.connect()
            await self.until(
                lambda: message_id in self.replies or not self.connected,
                max(0.0, deadline - loop.time()),
                f"the reply to {client_msg_id}",
            )
        return answer
