"""A sender's window across worker processes: the board of how far each worker's members got.

The board is a real shared file mapped twice, as two worker processes map it; the worker is
the harness's own, its connection a stand-in that takes every frame (what is under test is
when it sends, not the network).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator

import pytest

from chatload import LoadConfig
from chatload.accounting import marker
from chatload.flow import NO_LIMIT, DoneBoard, create_board
from chatload.session import Client
from chatload.worker import Worker

PROCS, CLIENTS, MEMBERS, WINDOW = 2, 4, 4, 2


@pytest.fixture
def boards() -> Iterator[tuple[DoneBoard, DoneBoard]]:
    path = create_board(PROCS, CLIENTS)
    views = (
        DoneBoard(path, PROCS, CLIENTS, 0),
        DoneBoard(path, PROCS, CLIENTS, 1),
    )
    try:
        yield views
    finally:
        for view in views:
            view.close()
        os.unlink(path)


class _Connection:
    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.fourth = asyncio.Event()

    def send(self, opcode: int, data: bytes) -> bool:
        self.sent.append(data)
        if len(self.sent) == 4:
            self.fourth.set()
        return True

    def close(self) -> None:
        pass


def _sent_two(
    boards: tuple[DoneBoard, DoneBoard],
) -> tuple[Worker, Client, _Connection, DoneBoard]:
    """Worker 0 of two, its client 0 the only sender of conversation 0 (members in both
    workers), connected, flat out, with its window of 2 sent; and worker 1's board."""
    mine, theirs = boards
    config = LoadConfig(
        urls=["ws://127.0.0.1:9/ws"],
        clients=CLIENTS,
        members=MEMBERS,
        senders=1,
        procs=PROCS,
        mode="chat",
        rate=0,
        window=WINDOW,
    ).validate()
    worker = Worker(config, 0, board=mine)
    client = worker.by_index[0]
    connection = _Connection()
    client.proto = connection  # type: ignore[assignment]
    client.conv_id, client.ready, client.closed = "c0", True, False
    worker.local_members[0] = 2  # clients 0 and 2 joined here; 1 and 3 in worker 1
    worker.running = True
    mine.watch([0])
    theirs.watch([0])
    assert worker.try_send(client) and worker.try_send(client)
    return worker, client, connection, theirs


def _done_here(worker: Worker, seq: int) -> None:
    """Both members in worker 0 have client 0's message ``seq``."""
    worker.on_done((0 << 32) | seq)


def test_a_new_board_holds_no_sender_back_until_a_worker_watches_it(
    boards: tuple[DoneBoard, DoneBoard],
) -> None:
    mine, theirs = boards
    assert mine.least(0) == NO_LIMIT
    mine.watch([0, 1])
    assert mine.least(0) == 0 and mine.least(2) == NO_LIMIT
    mine.done(0)
    mine.done(0)
    assert mine.least(0) == 2  # worker 1 has no member of sender 0's conversation
    theirs.watch([0])
    theirs.done(0)
    assert mine.least(0) == theirs.least(0) == 1  # each sees the other's row


def test_a_sender_waits_for_the_members_in_the_other_worker(
    boards: tuple[DoneBoard, DoneBoard],
) -> None:
    worker, client, connection, theirs = _sent_two(boards)
    assert not worker.try_send(client)  # the window is full
    _done_here(worker, 1)
    _done_here(worker, 2)
    # Its own members have both, so its old window would send two more: worker 1's have none.
    assert worker.counts["sent"] == 2 and client.inflight == 0
    assert not worker.try_send(client)
    theirs.done(0)  # worker 1's members have message 1
    assert worker.try_send(client)
    assert not worker.try_send(client)
    assert worker.counts["sent"] == 3 and len(connection.sent) == 3


def test_a_refused_message_is_not_waited_for(boards: tuple[DoneBoard, DoneBoard]) -> None:
    worker, client, _, theirs = _sent_two(boards)
    _done_here(worker, 1)
    theirs.done(0)
    worker.on_error(client, {"type": "error", "code": "rate_limited", "ref": marker(0, 2, 0)})
    # Message 2 will never arrive anywhere: the window holds only what members are owed, so
    # 2 more go (3 sent and not refused, 1 of them everywhere), as if 2 had never been sent.
    assert worker.try_send(client)
    assert not worker.try_send(client)
    assert worker.counts["sent"] == 4 and client.owed == 3


async def test_flat_out_the_worker_sends_again_when_the_other_catches_up(
    boards: tuple[DoneBoard, DoneBoard],
) -> None:
    worker, _, connection, theirs = _sent_two(boards)
    _done_here(worker, 1)
    _done_here(worker, 2)
    follower = asyncio.create_task(worker.follow_board())
    try:
        theirs.done(0)
        theirs.done(0)  # worker 1 caught up with no word to worker 0 but the board
        await asyncio.wait_for(connection.fourth.wait(), 5)
        assert worker.counts["sent_after_other_workers"] == 2
    finally:
        worker.running = False
        await asyncio.wait_for(follower, 5)
    assert worker.counts["sent"] == 4  # the window again: 2 beyond what every member has
