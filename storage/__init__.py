"""Storage: the store of record, hot windows, the outbox and the batch writer that drains it.

Imports only ``protocol`` and third-party libraries; ``chatserver`` wires the pieces.
"""

from .batch_writer import BatchWriter
from .outbox.base import Outbox, OutboxFull
from .outbox.memory import MemoryOutbox
from .records import (
    AppendResult,
    Conversation,
    ConversationPage,
    MessageDraft,
    MessagePage,
    OutboxEntry,
    User,
    WindowView,
)
from .store.base import Store, StoreUnavailable
from .store.sqlite import SqliteStore
from .window.base import AppendGate, AppendRefused, HotWindow, WindowMissing
from .window.memory import MemoryWindow

__all__ = [
    "AppendGate",
    "AppendRefused",
    "AppendResult",
    "BatchWriter",
    "Conversation",
    "ConversationPage",
    "HotWindow",
    "MemoryOutbox",
    "MemoryWindow",
    "MessageDraft",
    "MessagePage",
    "Outbox",
    "OutboxEntry",
    "OutboxFull",
    "SqliteStore",
    "Store",
    "StoreUnavailable",
    "User",
    "WindowMissing",
    "WindowView",
]
