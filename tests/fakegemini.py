"""A fake Gemini REST server: the real SDK (and the lean SSE path) talk to it over real HTTP.

    fake = FakeGemini()
    base_url = await fake.start()          # "http://127.0.0.1:PORT"
    fake.script(Status(429), Stream(["Hel", "lo"]))   # the next requests, in order
    ...
    fake.requests[0].body                  # what the client sent (parsed JSON)
    await fake.wait_disconnect(0)          # monotonic time the client went away
    await fake.close()

Routes (what google-genai calls with ``api_version="v1beta"``; ``tunedModels/{model}`` too):

- ``POST /v1beta/models/{model}:streamGenerateContent?alt=sse``: the next scripted
  behaviour (else ``fake.default``) answers: a :class:`Stream` of SSE events
  ``data: {"candidates":[{"content":{"parts":[{"text":…}],"role":"model"},"finishReason":…}],
  "usageMetadata":{…}}``, or a :class:`Status` error answer with Google's error body (with
  a ``google.rpc.RetryInfo`` when it has a ``retry_delay``). Any other path is a 404, as at
  Google: ``models/models/…`` included.
- ``GET /v1beta/models/{model}``: the model resource (the cheap health probe), counted in
  ``fake.probes`` (the names in ``fake.probed``); ``fake.probe_status`` makes it fail.

A stream *thinks* like Gemini 2.5: ``thoughts_tokens`` of thinking (none with a
``thinkingBudget`` of 0, at most the budget otherwise) count against ``maxOutputTokens``
before the answer's chunks do, and ``think_s`` is the silence before the first chunk.
``start(ssl_context=...)`` serves HTTPS.

Every stream request is recorded (:class:`Recorded`) with when it arrived, when its answer
ended and when the client disconnected before the end: the server runs with handler
cancellation, so a client that closes its connection is seen at once, not at the next write.

Run standalone for the benchmark (a separate process, so the measurement is of the client)::

    python -m tests.fakegemini --port 8765 --chunks 50 --pace-ms 0 --stamp
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import signal
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.fakegemini_wire import (
    echo_chunks,
    error_body,
    prompt_tokens,
    sse_event,
    thinking_spent,
)

_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}


@dataclass(frozen=True)
class Stream:
    """A 200 answer streamed as SSE events, one per chunk."""

    chunks: Sequence[str] | None = ("Hello", ", world", "!")  # None: echo, one word a chunk
    pace_s: float = 0.0  # between chunks (0: every event in one write)
    first_byte_delay_s: float = 0.0  # before the response headers
    finish: str | None = "STOP"  # on the last chunk; None: the stream never says why it ended
    usage: tuple[int, int] | None = None  # (prompt, candidates); default: counted; see no_usage
    no_usage: bool = False
    thoughts_tokens: int = 0  # what it thinks when nothing limits it
    think_s: float = 0.0  # after the response headers, before the first chunk
    drop_after: int | None = None  # cut the TCP connection after this many chunks
    error_after: int | None = None  # send an error event after this many chunks, then end
    error_code: int = 500
    block_reason: str | None = None  # promptFeedback.blockReason, no candidates at all
    stamp: bool = False  # the bench: each chunk's text ends with "|<send time_ns>"


@dataclass(frozen=True)
class Status:
    """An error answer with Google's error body, before any byte of a stream."""

    status: int
    message: str = "scripted failure"
    delay_s: float = 0.0
    retry_delay: str | None = None  # google.rpc.RetryInfo's retryDelay, e.g. "37s"


Behaviour = Stream | Status


@dataclass
class Recorded:
    model: str
    path: str
    query: str
    headers: dict[str, str]
    body: dict[str, Any]
    behaviour: Behaviour
    received_at: float
    ended_at: float | None = None  # the answer was fully written
    disconnected_at: float | None = None  # the client went away before the end
    chunks_sent: int = 0
    gone: asyncio.Event = field(default_factory=asyncio.Event)


class FakeGemini:
    def __init__(self, default: Behaviour | None = None) -> None:
        self.default: Behaviour = default if default is not None else Stream()
        self._script: collections.deque[Behaviour] = collections.deque()
        self.requests: list[Recorded] = []
        self.probes = 0
        self.probed: list[str] = []  # the names looked up, as the path gave them
        self.probe_status = 200
        self._arrived = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self.port = 0
        app = web.Application()
        for kind in ("models", "tunedModels"):
            app.router.add_post(f"/v1beta/{kind}/{{model}}", self._generate)
            app.router.add_get(f"/v1beta/{kind}/{{model}}", self._get_model)
        self.app = app
        self.scheme = "http"

    # -- control --------------------------------------------------------------------

    def script(self, *behaviours: Behaviour) -> None:
        self._script.extend(behaviours)

    @property
    def base_url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    async def start(
        self, host: str = "127.0.0.1", port: int = 0, ssl_context: ssl.SSLContext | None = None
    ) -> str:
        self._runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        self.scheme = "https" if ssl_context is not None else "http"
        site = web.TCPSite(self._runner, host, port, backlog=4096, ssl_context=ssl_context)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self.base_url

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def wait_requests(self, count: int, timeout: float = 5.0) -> list[Recorded]:
        async with asyncio.timeout(timeout), self._arrived:
            await self._arrived.wait_for(lambda: len(self.requests) >= count)
        return self.requests

    async def wait_disconnect(self, index: int = -1, timeout: float = 5.0) -> float:
        """When the client of request ``index`` disconnected (monotonic seconds)."""
        record = self.requests[index]
        async with asyncio.timeout(timeout):
            await record.gone.wait()
        assert record.disconnected_at is not None, "the answer ended without a disconnect"
        return record.disconnected_at

    # -- handlers -------------------------------------------------------------------

    async def _get_model(self, request: web.Request) -> web.Response:
        self.probes += 1
        kind = request.path.split("/")[2]
        name = request.match_info["model"]
        self.probed.append(f"{kind}/{name}")
        if self.probe_status != 200:
            return web.json_response(
                error_body(self.probe_status, "probe failed"), status=self.probe_status
            )
        return web.json_response(
            {"name": f"{kind}/{name}", "displayName": name, "inputTokenLimit": 1048576}
        )

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        model, _, method = request.match_info["model"].partition(":")
        if request.path.split("/")[2] == "tunedModels":
            model = f"tunedModels/{model}"
        if method != "streamGenerateContent":
            return web.json_response(error_body(404, f"no method {method!r}"), status=404)
        body = await request.json()
        behaviour = self._script.popleft() if self._script else self.default
        record = Recorded(
            model=model,
            path=request.path,
            query=request.query_string,
            headers=dict(request.headers),
            body=body,
            behaviour=behaviour,
            received_at=time.monotonic(),
        )
        self.requests.append(record)
        async with self._arrived:
            self._arrived.notify_all()
        try:
            if isinstance(behaviour, Status):
                if behaviour.delay_s:
                    await asyncio.sleep(behaviour.delay_s)
                response: web.StreamResponse = web.json_response(
                    error_body(behaviour.status, behaviour.message, behaviour.retry_delay),
                    status=behaviour.status,
                )
            else:
                response = await self._stream(request, record, behaviour, model)
        except (asyncio.CancelledError, ConnectionError):
            record.disconnected_at = time.monotonic()
            record.gone.set()
            raise
        if record.disconnected_at is None:
            record.ended_at = time.monotonic()
        record.gone.set()
        return response

    async def _stream(
        self, request: web.Request, record: Recorded, spec: Stream, model: str
    ) -> web.StreamResponse:
        if spec.first_byte_delay_s:
            await asyncio.sleep(spec.first_byte_delay_s)
        response = web.StreamResponse(headers=_SSE_HEADERS)
        response.enable_chunked_encoding()
        await response.prepare(request)
        prompt = prompt_tokens(record.body)
        if spec.block_reason is not None:
            blocked = {
                "promptFeedback": {"blockReason": spec.block_reason},
                "usageMetadata": {"promptTokenCount": prompt, "totalTokenCount": prompt},
                "modelVersion": model,
            }
            await response.write(sse_event(blocked))
            await response.write_eof()
            return response
        chunks = list(spec.chunks) if spec.chunks is not None else echo_chunks(record.body)
        finish = spec.finish
        generation = record.body.get("generationConfig") or {}
        thoughts = thinking_spent(spec.thoughts_tokens, generation.get("thinkingConfig"))
        limit = generation.get("maxOutputTokens")
        if isinstance(limit, int) and thoughts + len(chunks) > limit:  # a chunk is a token
            thoughts = min(thoughts, limit)  # thinking first: it may leave nothing
            chunks, finish = chunks[: limit - thoughts], "MAX_TOKENS"
        if spec.think_s:
            await asyncio.sleep(spec.think_s)
        if not chunks:  # all of it went to thinking: one event with the finish and usage
            event = {
                "candidates": [{"content": {"parts": [], "role": "model"}, "finishReason": finish}],
                "usageMetadata": {
                    "promptTokenCount": prompt,
                    "totalTokenCount": prompt + thoughts,
                    "thoughtsTokenCount": thoughts,
                },
                "modelVersion": model,
            }
            await response.write(sse_event(event))
            await response.write_eof()
            return response
        total = len(chunks)
        pending: list[bytes] = []
        loop = asyncio.get_running_loop()
        started = loop.time()
        for index, text in enumerate(chunks):
            if spec.drop_after is not None and index == spec.drop_after:
                await self._flush(response, pending)
                assert request.transport is not None
                request.transport.abort()  # a cut connection: no terminating chunk
                record.disconnected_at = time.monotonic()
                return response
            if spec.error_after is not None and index == spec.error_after:
                pending.append(sse_event(error_body(spec.error_code, "mid-stream failure")))
                await self._flush(response, pending)
                await response.write_eof()
                return response
            if spec.pace_s and index:
                await self._flush(response, pending)
                # on an absolute schedule: a busy fake still offers the paced rate
                await asyncio.sleep(max(0.0, started + index * spec.pace_s - loop.time()))
            last = index == total - 1
            if spec.stamp:
                text = f"{text}|{time.time_ns()}"
            candidate: dict[str, Any] = {
                "content": {"parts": [{"text": text}], "role": "model"},
                "index": 0,
            }
            if last and finish is not None:
                candidate["finishReason"] = finish
            event: dict[str, Any] = {"candidates": [candidate], "modelVersion": model}
            if not spec.no_usage:
                if last:
                    used = spec.usage or (prompt, total)
                    usage = {
                        "promptTokenCount": used[0],
                        "candidatesTokenCount": used[1],
                        "totalTokenCount": used[0] + used[1] + thoughts,
                    }
                    if thoughts:
                        usage["thoughtsTokenCount"] = thoughts
                else:
                    usage = {"promptTokenCount": (spec.usage or (prompt, 0))[0]}
                event["usageMetadata"] = usage
            pending.append(sse_event(event))
            record.chunks_sent += 1
        await self._flush(response, pending)
        await response.write_eof()
        return response

    @staticmethod
    async def _flush(response: web.StreamResponse, pending: list[bytes]) -> None:
        if pending:
            await response.write(b"".join(pending))
            pending.clear()


# -- standalone (the benchmark's fake, in its own process) ------------------------------


async def _serve(args: argparse.Namespace) -> None:
    words = [f"tok{i} " for i in range(args.chunks)]
    fake = FakeGemini(Stream(words, pace_s=args.pace_ms / 1000, stamp=args.stamp))
    fake.requests = _Discard()  # a bench must not grow memory
    await fake.start(port=args.port)
    print(f"fakegemini listening on {fake.base_url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await fake.close()


class _Discard(list[Recorded]):
    def append(self, item: Recorded) -> None:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--chunks", type=int, default=50)
    parser.add_argument("--pace-ms", type=float, default=0.0)
    parser.add_argument("--stamp", action="store_true")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        try:
            import uvloop

            uvloop.run(_serve(args))
        except ImportError:
            asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
