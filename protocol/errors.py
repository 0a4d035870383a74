"""The one exception the protocol layer raises."""

from __future__ import annotations

from .codes import ErrorCode


class ProtocolError(Exception):
    """Malformed or unacceptable input; carries the wire error code and the frame's ``ref``."""

    def __init__(self, code: ErrorCode, message: str, ref: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.ref = ref

    def __repr__(self) -> str:
        return f"ProtocolError({self.code.value!r}, {self.message!r}, ref={self.ref!r})"
