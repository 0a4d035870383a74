"""Pooled random UUIDs: the format of ``uuid.uuid4()``, never the same id twice; name-based
ones equal to ``uuid.uuid5``."""

from __future__ import annotations

import os
import uuid

from hypothesis import given
from hypothesis import strategies as st

from protocol import ids
from protocol.ids import format_uuid4, uuid4_str, uuid5_str


@given(st.binary(min_size=16, max_size=16))
def test_the_format_is_the_uuid_modules(raw: bytes) -> None:
    assert format_uuid4(raw) == str(uuid.UUID(bytes=raw, version=4))


@given(st.binary(min_size=16, max_size=16), st.text())
def test_name_based_ids_are_the_uuid_modules(namespace: bytes, name: str) -> None:
    assert uuid5_str(namespace, name) == str(uuid.uuid5(uuid.UUID(bytes=namespace), name))


def test_ids_are_version_4_and_distinct_across_pool_refills() -> None:
    made = [uuid4_str() for _ in range(3 * 256 + 7)]
    assert len(set(made)) == len(made)
    for text in made:
        parsed = uuid.UUID(text)
        assert str(parsed) == text and parsed.version == 4
        assert parsed.variant == uuid.RFC_4122


def test_a_forked_child_does_not_reuse_the_parents_pool() -> None:
    uuid4_str()  # the pool holds unused bytes now
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next id, to the parent
        os.close(read)
        os.write(write, uuid4_str().encode())
        os._exit(0)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    child = os.read(read, 64).decode()
    os.close(read)
    assert os.waitstatus_to_exitcode(status) == 0
    assert child != uuid4_str()
    assert ids._pos <= ids._POOL
