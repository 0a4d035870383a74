"""Redis key names of the storage layer, in one place.

Every key starts with a prefix (default ``chat``). The keys of one conversation carry the hash
tag ``{<conversation_id>}`` so that they live in one Redis Cluster slot and a Lua script may
touch them together::

    chat:{<conv>}:seq              offset counter (INCR), outlives the window
    chat:{<conv>}:epoch            epoch of the loaded window; missing = window missing
    chat:{<conv>}:win              window stream, entry id = <offset>-0, trimmed to the size
    chat:{<conv>}:idem:<hash>      idempotency record of (user, client_msg_id)

The outbox is global: ``chat:outbox`` with one shard, else ``chat:outbox:{0}`` ... ``{n-1}``
(each shard its own hash tag, so the shards spread over a cluster). A conversation's messages
always go to the same shard (:func:`outbox_shard`).
"""

from __future__ import annotations

import hashlib
import zlib

DEFAULT_PREFIX = "chat"


class ConversationKeys:
    """The key names of one conversation."""

    __slots__ = ("base", "epoch", "seq", "win")

    def __init__(self, prefix: str, conversation_id: str) -> None:
        tag = conversation_id
        if "{" in tag or "}" in tag:
            # A brace would move the hash tag and split the conversation over slots.
            tag = "h-" + hashlib.blake2b(tag.encode(), digest_size=16).hexdigest()
        self.base = f"{prefix}:{{{tag}}}"
        self.seq = f"{self.base}:seq"
        self.epoch = f"{self.base}:epoch"
        self.win = f"{self.base}:win"

    def idem(self, user_id: str | None, client_msg_id: str) -> str:
        """The idempotency record of one (user, client_msg_id) in this conversation."""
        raw = f"{user_id or ''}\x00{client_msg_id}".encode()
        return f"{self.base}:idem:{hashlib.blake2b(raw, digest_size=16).hexdigest()}"


def outbox_key(prefix: str, shards: int, shard: int) -> str:
    if shards == 1:
        return f"{prefix}:outbox"
    return f"{prefix}:outbox:{{{shard}}}"


def outbox_shard(conversation_id: str, shards: int) -> int:
    """The outbox shard of a conversation: stable across processes and restarts."""
    if shards == 1:
        return 0
    return zlib.crc32(conversation_id.encode()) % shards
