"""The key names of ``storage.redis_keys``: their wire form and their cluster slots."""

from __future__ import annotations

import re
from pathlib import Path

from redis.crc import key_slot

from storage import redis_keys as rk


def test_conversation_keys_share_one_slot() -> None:
    keys = rk.ConversationKeys("chat", "c1")
    names = [
        keys.seq,
        keys.epoch,
        keys.win,
        keys.idem("u1", "k1"),
        keys.no_idem,
        keys.events,
        keys.reply,
        keys.reply_text,
        keys.reply_next,
    ]
    assert names[:3] == ["chat:{c1}:seq", "chat:{c1}:epoch", "chat:{c1}:win"]
    assert names[5:] == [
        "chat:{c1}:events",
        "chat:{c1}:reply",
        "chat:{c1}:reply_text",
        "chat:{c1}:reply_next",
    ]
    assert len({key_slot(name.encode()) for name in names}) == 1


def test_a_brace_in_a_conversation_id_cannot_move_the_hash_tag() -> None:
    keys = rk.ConversationKeys("chat", "a}b{c")
    assert keys.seq.startswith("chat:{h-") and keys.seq.count("{") == 1


def test_global_and_user_keys() -> None:
    assert rk.outbox_key("chat", 1, 0) == "chat:outbox"
    assert rk.outbox_key("chat", 3, 2) == "chat:outbox:{2}"
    assert rk.instance_alive_key("p", "s1") == "p:{inst-s1}:alive"
    assert rk.instance_replies_key("p", "s1") == "p:{inst-s1}:replies"
    assert rk.instances_key("p") == "p:instances"
    assert rk.instance_jobs_key("p", "s1") == "p:{inst-s1}:jobs"
    assert rk.job_holders_key("p") == "p:job_holders"
    assert rk.job_reports_key("p") == "p:job_reports"
    assert rk.legacy_jobs_key("p") == "p:jobs"
    conv = rk.ConversationKeys("p", "c1")
    assert (conv.jobs, conv.legacy_jobs) == ("p:{c1}:reply_jobs", "p:{c1}:jobs")
    assert rk.control_channel("p", "s1") == "p:{ctl-s1}:control"
    assert rk.response_cache_key("p", "abc") == "p:rcache:abc"
    conns = rk.user_key("p", "u1", "conns")
    tokens = rk.user_key("p", "u1", "tokens", "2026-11-18")
    assert (conns, tokens) == ("p:{u:u1}:conns", "p:{u:u1}:tokens:2026-11-18")
    assert key_slot(conns.encode()) == key_slot(tokens.encode())


def test_no_module_builds_a_key_of_its_own() -> None:
    """Every Redis key name comes from storage/redis_keys.py: a key built elsewhere is one the
    key table in docs/architecture.md and the slot rules do not know about."""
    root = Path(__file__).resolve().parents[2]
    built_here = re.compile(r"""f["'][^"']*\{[^}]*prefix[^}]*\}:""")
    offenders = [
        f"{path.relative_to(root)}:{number}"
        for package in ("storage", "chatserver")
        for path in sorted((root / package).rglob("*.py"))
        if path.name != "redis_keys.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if built_here.search(line)
    ]
    assert offenders == []
    assert built_here.search('f"{self._prefix}:outbox"')  # the pattern does catch one
