"""Model routing: simple turns go to the agent's cheaper ``light_model``.

The rule: an agent with a ``light_model`` answers a conversation's first turn with it when
the question is at most ``light_max_chars`` long (after trimming). Everything else, and
every agent without a light model, uses the agent's ``model``. The chosen model is what
``gen_start`` announces and what the stored reply records.
"""

from __future__ import annotations

from dataclasses import dataclass

from protocol import Message

from ..agents import Agent


@dataclass(frozen=True, slots=True)
class Route:
    model: str
    route: str  # "light" | "default": the metric label


def is_first_turn(message: Message) -> bool:
    """The first message of a conversation: nothing came before it (offsets start at 1)."""
    return message.offset == 1


class Router:
    def __init__(self, light_max_chars: int = 200) -> None:
        self.light_max_chars = light_max_chars

    def choose(self, agent: Agent, message: Message) -> Route:
        return self.route(agent, message.text, first_turn=is_first_turn(message))

    def route(self, agent: Agent, text: str, *, first_turn: bool) -> Route:
        """``choose`` before the question has its offset (whether it is the first turn)."""
        if (
            agent.light_model
            and self.light_max_chars > 0
            and first_turn
            and len(text.strip()) <= self.light_max_chars
        ):
            return Route(agent.light_model, "light")
        return Route(agent.model, "default")
