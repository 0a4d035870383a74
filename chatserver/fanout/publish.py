"""Publishing one frame to a conversation through the broker."""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from .. import keys
from .events import Event


async def publish(app: web.Application, conversation_id: str, frame: dict[str, Any]) -> None:
    await app[keys.BROKER].publish(Event(conversation_id, frame, time.time()))
