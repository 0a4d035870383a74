"""Redis key names of the storage layer and of the server, in one place.

Every key starts with a prefix (default ``chat``). The keys of one conversation carry the hash
tag ``{<conversation_id>}`` so that they live in one Redis Cluster slot and a Lua script may
touch them together::

    chat:{<conv>}:seq              offset counter (INCR), outlives the window
    chat:{<conv>}:epoch            epoch of the loaded window; missing = window missing
    chat:{<conv>}:win              window stream, entry id = <offset>-0, trimmed to the size
    chat:{<conv>}:idem:<hash>      idempotency record of (user, client_msg_id)
    chat:{<conv>}:reply            the running reply: gid, owner, agent, model, reply_to,
                                   seq, watched
    chat:{<conv>}:reply_text       its text so far (to the last checkpoint when unwatched)
    chat:{<conv>}:reply_next       the reply waiting for the slot (it goes next)
    chat:{<conv>}:reply_jobs       the unfinished reply jobs (sorted set of ids by offset), with
                                   :reply_jobs_data (hash: holder, time, question) and
                                   :reply_jobs_n (their count, a string the append reads)
    chat:{<conv>}:watchers         set of the instances with a local member joined
    chat:{<conv>}:events           the conversation's fan-out channel between instances
    chat:{<conv>}:presence         sorted set of (instance NUL user) entries of the members
                                   joined there, scored by expiry (ms), renewed by the instance
    chat:{inst-<server>}:alive     an instance's liveness (PX one lease, renewed every third)
    chat:{inst-<server>}:replies   set of that instance's running replies (conv TAB gen); a
                                   cancel from elsewhere finds a reply's conversation here
    chat:{inst-<server>}:jobs      set of the reply jobs that instance holds (conv TAB job id);
                                   done ones leave it with its next renewal
    chat:instances                 set of instance ids that ever ran a reply (the sweep's list)
    chat:job_holders               set of instance ids that ever held a reply job (the claims')
    chat:job_reports               hash: per holder, its jobs and the oldest one's time (ms)

The outbox is global: ``chat:outbox`` with one shard, else ``chat:outbox:{0}`` ... ``{n-1}``
(each shard its own hash tag, so the shards spread over a cluster). A conversation's messages
always go to the same shard (:func:`outbox_shard`). The other keys::

    chat:{ctl-<server>}:control    control messages to one instance (cancel a reply)
    chat:{u:<user>}:<kind>[:...]   a user's limits: conns, bucket, tokens:<UTC day>
    chat:{m:<model>}:inflight      a model's requests in flight (the model guard's permits)
    chat:{m:<model>}:started       a model's requests started within the last minute
    chat:rcache:<digest>           a cached model answer
"""

from __future__ import annotations

import functools
import hashlib
import zlib

DEFAULT_PREFIX = "chat"


class ConversationKeys:
    """The key names of one conversation (``conversation_keys`` keeps those of the busy
    ones: the append path asks for most of them per message)."""

    __slots__ = (
        "base",
        "epoch",
        "events",
        "jobs",
        "jobs_count",
        "jobs_data",
        "no_idem",
        "seq",
        "watchers",
        "win",
    )

    def __init__(self, prefix: str, conversation_id: str) -> None:
        tag = conversation_id
        if "{" in tag or "}" in tag:
            # A brace would move the hash tag and split the conversation over slots.
            tag = "h-" + hashlib.blake2b(tag.encode(), digest_size=16).hexdigest()
        base = self.base = f"{prefix}:{{{tag}}}"
        self.seq = f"{base}:seq"
        self.epoch = f"{base}:epoch"
        self.win = f"{base}:win"
        # The conversation's unfinished reply jobs by offset (storage/jobs/redis.py); each
        # unfinished job's holder, time and question; how many (read with the window's
        # append MGET: no key, none).
        self.jobs = f"{base}:reply_jobs"
        self.jobs_data = f"{base}:reply_jobs_data"
        self.jobs_count = f"{base}:reply_jobs_n"
        # The conversation's pub/sub channel, and the instances with a local member joined
        # (publish only when another one is in).
        self.events = f"{base}:events"
        self.watchers = f"{base}:watchers"
        # A key in the conversation's slot that is never set: the record of a message that
        # has no ``client_msg_id`` (a script's key list keeps one shape).
        self.no_idem = f"{base}:idem:"

    @property
    def reply(self) -> str:
        return f"{self.base}:reply"

    @property
    def reply_text(self) -> str:
        return f"{self.base}:reply_text"

    @property
    def reply_next(self) -> str:
        return f"{self.base}:reply_next"

    def job_keys(self) -> list[str]:
        """The three keys of the jobs (order, data, count), as the scripts take them."""
        return [self.jobs, self.jobs_data, self.jobs_count]

    @property
    def legacy_jobs(self) -> str:
        """Older releases' sorted set of the conversation's jobs (``legacy_jobs_key``)."""
        return f"{self.base}:jobs"

    @property
    def presence(self) -> str:
        """Who is online in the conversation: an entry per (instance, user), with an expiry."""
        return f"{self.base}:presence"

    def idem(self, user_id: str | None, client_msg_id: str) -> str:
        """The idempotency record of one (user, client_msg_id) in this conversation."""
        raw = f"{user_id or ''}\x00{client_msg_id}".encode()
        return f"{self.base}:idem:{hashlib.blake2b(raw, digest_size=16).hexdigest()}"


@functools.lru_cache(maxsize=1024)
def conversation_keys(prefix: str, conversation_id: str) -> ConversationKeys:
    """The keys of a conversation, built once while it is busy: ten strings, where a
    message's path asked for a new set of them several times (~1 KB a conversation kept)."""
    return ConversationKeys(prefix, conversation_id)


def outbox_key(prefix: str, shards: int, shard: int) -> str:
    if shards == 1:
        return f"{prefix}:outbox"
    return f"{prefix}:outbox:{{{shard}}}"


def outbox_shard(conversation_id: str, shards: int) -> int:
    """The outbox shard of a conversation: stable across processes and restarts."""
    if shards == 1:
        return 0
    return zlib.crc32(conversation_id.encode()) % shards


def instance_alive_key(prefix: str, server_id: str) -> str:
    return f"{prefix}:{{inst-{server_id}}}:alive"


def instance_replies_key(prefix: str, server_id: str) -> str:
    return f"{prefix}:{{inst-{server_id}}}:replies"


def instance_jobs_key(prefix: str, server_id: str) -> str:
    return f"{prefix}:{{inst-{server_id}}}:jobs"


def job_holders_key(prefix: str) -> str:
    return f"{prefix}:job_holders"


def legacy_jobs_key(prefix: str) -> str:
    """The reply jobs of releases before per-conversation job strings: a stream whose
    entries a claim turns into jobs of today's kind (storage/jobs/redis.py)."""
    return f"{prefix}:jobs"


def job_reports_key(prefix: str) -> str:
    return f"{prefix}:job_reports"


def instances_key(prefix: str) -> str:
    return f"{prefix}:instances"


def control_channel(prefix: str, server_id: str) -> str:
    """The channel of control messages to one instance."""
    return f"{prefix}:{{ctl-{server_id}}}:control"


def user_key(prefix: str, user_id: str, kind: str, *rest: str) -> str:
    """One of a user's limit keys; a user's keys share a hash tag (one node on a cluster)."""
    return ":".join([f"{prefix}:{{u:{user_id}}}:{kind}", *rest])


def model_key(prefix: str, model: str, kind: str) -> str:
    """One of a model's guard keys (``inflight``, ``started``), under one hash tag."""
    return f"{prefix}:{{m:{model}}}:{kind}"


def response_cache_key(prefix: str, digest: str) -> str:
    return f"{prefix}:rcache:{digest}"
