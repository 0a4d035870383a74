"""The load harness is driven against the in-process server of the chatserver tests."""

from tests.chatserver.conftest import encoding, make_harness, settings

__all__ = ["encoding", "make_harness", "settings"]
