"""What counts as a dependency failure (answered `unavailable`, not `internal`): uvloop's
refusal to write on a connection it has closed included, as a cluster node's restart
surfaces it through redis-py."""

from __future__ import annotations

import asyncio

import pytest
import uvloop

from chatserver.errors import is_dependency_failure
from storage import StoreUnavailable


async def _write_on_a_closed_transport() -> BaseException:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.transport.abort()
        await asyncio.sleep(0)  # the loop closes the handle
        try:
            writer.writelines([b"PING\r\n"])  # what redis-py's connection does
        except BaseException as exc:
            return exc
        raise AssertionError("the write on a closed transport was accepted")
    finally:
        server.close()


def test_uvloops_closed_transport_is_a_dependency_failure() -> None:
    refused = uvloop.run(_write_on_a_closed_transport())
    assert isinstance(refused, RuntimeError) and is_dependency_failure(refused)


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (StoreUnavailable("down"), True),
        (ConnectionResetError(), True),
        (TimeoutError(), True),
        (RuntimeError("a bug"), False),
        (ValueError("bad"), False),
    ],
)
def test_what_else_counts(exc: BaseException, expected: bool) -> None:
    assert is_dependency_failure(exc) is expected
