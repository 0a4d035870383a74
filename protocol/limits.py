"""Bounds on every client input, in one object fed from the server settings."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Limits:
    max_frame_bytes: int = 64 * 1024
    max_text_chars: int = 8000
    max_client_msg_id_chars: int = 64
    max_ref_chars: int = 64
    max_id_chars: int = 64
    max_token_chars: int = 4096
    max_title_chars: int = 200
    max_depth: int = 16  # nesting of objects and arrays in one frame
    max_object_keys: int = 64  # keys of one object: more than any frame of the protocol has
    max_members: int = 100
    history_max_limit: int = 100
    history_default_limit: int = 50

    def __post_init__(self) -> None:
        for name in self.__slots__:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"limit {name} must be a positive integer, got {value!r}")
        if self.history_default_limit > self.history_max_limit:
            raise ValueError("history_default_limit must not exceed history_max_limit")

    @property
    def max_array_items(self) -> int:
        """The longest array any frame carries: a member list or a page of messages."""
        return max(self.max_members, self.history_max_limit)

    def msgpack_bounds(self) -> dict[str, int]:
        """``msgpack.unpackb`` bounds. Without them every array or map header reserves room
        for as many items as the frame has bytes before a single item is read, and nested
        headers multiply that: one 64 KiB frame could make the decoder reserve ~500 MB."""
        return {
            "max_str_len": self.max_frame_bytes,
            "max_bin_len": self.max_frame_bytes,
            "max_array_len": self.max_array_items,
            "max_map_len": self.max_object_keys,
            "max_ext_len": 0,  # the protocol has no extension types
        }


DEFAULT_LIMITS = Limits()
