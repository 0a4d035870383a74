"""``record``: the immutable value types built on the hot path (frames, messages, envelopes).

A frozen dataclass sets each field in ``__init__`` through ``object.__setattr__``: about four
times the cost of a plain slots dataclass. A dozen such objects are built per message (the
frame parsed, the message completed and decoded again, the ack, the envelope, ...): ~5% of a
production instance's CPU under the fan-out load. A ``record`` is a slots dataclass hashed by
its fields, which type checkers treat as frozen (``dataclass_transform(frozen_default=True)``):
assigning a field is a type error, as before; only at run time is it no longer refused.
Configuration (settings and the like) stays a frozen dataclass: built once, refused at run time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeVar, dataclass_transform

_T = TypeVar("_T")


@dataclass_transform(frozen_default=True, field_specifiers=(field,))
def record(cls: type[_T]) -> type[_T]:
    """``cls`` as a slots dataclass with a field hash (equal records hash alike)."""
    return dataclass(slots=True, unsafe_hash=True)(cls)
