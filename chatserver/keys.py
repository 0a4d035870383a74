"""Typed keys of the aiohttp application: every shared resource lives under one."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from protocol import Limits
from storage.outbox.base import Outbox
from storage.store.base import Store
from storage.window.base import HotWindow

from .agents import AgentCatalog
from .auth import Authenticator
from .broker.base import Broker
from .conversations import ConversationService
from .generation.buffer import ReplyBuffer
from .generation.manager import GenerationManager
from .hub import LocalHub
from .limits.base import Limiter
from .metrics import Metrics
from .outbound import Flusher
from .settings import Settings


@dataclass
class RunState:
    draining: bool = False
    users: dict[str, int] = field(default_factory=dict)  # user id -> open connections here
    connections: set[Any] = field(default_factory=set)  # the gateway's live connections


SETTINGS = web.AppKey("settings", Settings)
LIMITS = web.AppKey("limits", Limits)  # the protocol bounds, built once from the settings
# The redis.asyncio client, or None in embedded mode.
REDIS: web.AppKey[Redis | RedisCluster | None] = web.AppKey("redis")
METRICS = web.AppKey("metrics", Metrics)
AUTH = web.AppKey("auth", Authenticator)
AGENTS = web.AppKey("agents", AgentCatalog)
STATE = web.AppKey("state", RunState)
FLUSHER = web.AppKey("flusher", Flusher)
STORE = web.AppKey("store", Store)
WINDOW = web.AppKey("window", HotWindow)
OUTBOX = web.AppKey("outbox", Outbox)
BROKER = web.AppKey("broker", Broker)
HUB = web.AppKey("hub", LocalHub)
REPLY_BUFFER = web.AppKey("reply_buffer", ReplyBuffer)
CONVERSATIONS = web.AppKey("conversations", ConversationService)
GENERATION = web.AppKey("generation", GenerationManager)
LIMITER = web.AppKey("limiter", Limiter)
