"""Typed keys of the aiohttp application: every shared resource lives under one.

The value types are imported for type checking only, so that this module ties no group of the
package to another at run time: any module may import the keys it needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.cluster import RedisCluster

    from protocol import Limits
    from storage.outbox.base import Outbox
    from storage.store.base import Store
    from storage.window.base import HotWindow

    from .agents import AgentCatalog
    from .auth import Authenticator
    from .conversations import ConversationService
    from .fanout.broker.base import Broker
    from .fanout.hub import LocalHub
    from .fanout.outbound import Flusher
    from .generation.buffer import ReplyBuffer
    from .generation.manager import GenerationManager
    from .limits.base import Limiter
    from .ops.memory import Bounded, HeapProfiler
    from .ops.metrics import Metrics
    from .presence.tracker import PresenceTracker
    from .settings import Settings
    from .ws.admission import Admission
    from .ws.typing_gate import TypingGate


@dataclass
class RunState:
    draining: bool = False
    users: dict[str, int] = field(default_factory=dict)  # user id -> open connections here
    connections: set[Any] = field(default_factory=set)  # the gateway's live connections


SETTINGS: web.AppKey[Settings] = web.AppKey("settings")
LIMITS: web.AppKey[Limits] = web.AppKey(
    "limits"
)  # the protocol bounds, built once from the settings
# The redis.asyncio client, or None in embedded mode.
REDIS: web.AppKey[Redis | RedisCluster | None] = web.AppKey("redis")
METRICS: web.AppKey[Metrics] = web.AppKey("metrics")
AUTH: web.AppKey[Authenticator] = web.AppKey("auth")
AGENTS: web.AppKey[AgentCatalog] = web.AppKey("agents")
STATE: web.AppKey[RunState] = web.AppKey("state")
FLUSHER: web.AppKey[Flusher] = web.AppKey("flusher")
STORE: web.AppKey[Store] = web.AppKey("store")
WINDOW: web.AppKey[HotWindow] = web.AppKey("window")
OUTBOX: web.AppKey[Outbox] = web.AppKey("outbox")
BROKER: web.AppKey[Broker] = web.AppKey("broker")
HUB: web.AppKey[LocalHub] = web.AppKey("hub")
REPLY_BUFFER: web.AppKey[ReplyBuffer] = web.AppKey("reply_buffer")
CONVERSATIONS: web.AppKey[ConversationService] = web.AppKey("conversations")
GENERATION: web.AppKey[GenerationManager] = web.AppKey("generation")
LIMITER: web.AppKey[Limiter] = web.AppKey("limiter")
ADMISSION: web.AppKey[Admission] = web.AppKey("admission")  # sockets not yet authenticated
TYPING: web.AppKey[TypingGate] = web.AppKey("typing")
PRESENCE: web.AppKey[PresenceTracker] = web.AppKey("presence")
# The bounded in-process structures (their fill, for the gauges and the admin route).
BOUNDED: web.AppKey[Bounded] = web.AppKey("bounded")
HEAP: web.AppKey[HeapProfiler] = web.AppKey("heap")  # heap figures; tracemalloc when set
