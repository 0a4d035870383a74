"""The agent catalogue: a TOML file shipped in the package, overridable with --agents."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any


class AgentCatalogError(ValueError):
    """The agents file is unreadable or an entry is invalid; the message names which."""


@dataclass(frozen=True, slots=True)
class Agent:
    id: str
    name: str
    description: str
    model: str
    system_prompt: str
    light_model: str | None = None
    temperature: float = 0.7
    max_output_tokens: int = 1024
    public: bool = True
    cacheable: bool = False
    # Gemini's thinkingBudget: 0 off, -1 the model decides, N at most N tokens; None: not
    # sent (the model's default; Gemini 2.5 Flash and Pro think by default).
    thinking_budget: int | None = None

    def public_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "description": self.description,
            "model": self.model,
            "public": self.public,
        }


_REQUIRED = {"id": str, "name": str, "description": str, "model": str, "system_prompt": str}
_OPTIONAL: dict[str, tuple[type, ...]] = {
    "light_model": (str,),
    "temperature": (int, float),
    "max_output_tokens": (int,),
    "public": (bool,),
    "cacheable": (bool,),
    "thinking_budget": (int,),
}
# Gemini's largest budget (2.5 Pro: 32,768; Flash: 24,576).
MAX_THINKING_BUDGET = 32_768
# A model name as Gemini's REST paths take it: an id, or a resource name ``models/<id>`` or
# ``tunedModels/<id>``. Nothing else: the name becomes a URL path (and a Redis key's tag).
MODEL_NAME = re.compile(r"(?:(?:models|tunedModels)/)?[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def is_model_name(name: str) -> bool:
    return MODEL_NAME.fullmatch(name) is not None


def _agent(entry: Any, where: str) -> Agent:
    if not isinstance(entry, dict):
        raise AgentCatalogError(f"{where}: an agent must be a table")
    unknown = set(entry) - set(_REQUIRED) - set(_OPTIONAL)
    if unknown:
        raise AgentCatalogError(f"{where}: unknown keys {sorted(unknown)}")
    for key, kind in _REQUIRED.items():
        if not isinstance(entry.get(key), kind) or not entry[key]:
            raise AgentCatalogError(f"{where}: '{key}' must be a non-empty string")
    for key, kinds in _OPTIONAL.items():
        value = entry.get(key)
        # bool is an int: `max_output_tokens = true` must not pass as 1
        wrong_bool = isinstance(value, bool) and bool not in kinds
        if key in entry and (not isinstance(value, kinds) or wrong_bool):
            raise AgentCatalogError(f"{where}: '{key}' has the wrong type")
    if len(entry["id"]) > 64:
        raise AgentCatalogError(f"{where}: 'id' longer than 64 characters")
    if not 0 <= float(entry.get("temperature", 0.7)) <= 2:
        raise AgentCatalogError(f"{where}: 'temperature' must be within 0..2")
    max_output = int(entry.get("max_output_tokens", 1024))
    if max_output < 1:
        raise AgentCatalogError(f"{where}: 'max_output_tokens' must be positive")
    for key in ("model", "light_model"):
        if key in entry and not is_model_name(entry[key]):
            raise AgentCatalogError(
                f"{where}: '{key}' must be a model id or models/<id>, tunedModels/<id>"
            )
    budget = entry.get("thinking_budget")
    if budget is not None:
        if not -1 <= budget <= MAX_THINKING_BUDGET:
            raise AgentCatalogError(
                f"{where}: 'thinking_budget' must be -1 (dynamic), 0 (off) "
                f"or up to {MAX_THINKING_BUDGET}"
            )
        # Thinking tokens count against max_output_tokens: a budget that fills it leaves
        # no room for the answer (finish `length` with no text).
        if budget >= max_output:
            raise AgentCatalogError(
                f"{where}: 'thinking_budget' ({budget}) leaves no room for the answer "
                f"within 'max_output_tokens' ({max_output})"
            )
    return Agent(**{**entry, "temperature": float(entry.get("temperature", 0.7))})


class AgentCatalog:
    def __init__(self, agents: list[Agent]) -> None:
        if not agents:
            raise AgentCatalogError("the catalogue has no agents")
        self._by_id: dict[str, Agent] = {}
        for agent in agents:
            if agent.id in self._by_id:
                raise AgentCatalogError(f"duplicate agent id {agent.id!r}")
            self._by_id[agent.id] = agent

    def get(self, agent_id: str) -> Agent | None:
        return self._by_id.get(agent_id)

    def public(self) -> list[Agent]:
        return [a for a in self._by_id.values() if a.public]

    def __iter__(self) -> Iterator[Agent]:
        return iter(self._by_id.values())

    @classmethod
    def from_toml(cls, text: str, source: str) -> AgentCatalog:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise AgentCatalogError(f"{source}: {exc}") from None
        entries = data.get("agents")
        if not isinstance(entries, list):
            raise AgentCatalogError(f"{source}: expected [[agents]] tables")
        return cls([_agent(e, f"{source}: agents[{i}]") for i, e in enumerate(entries)])

    @classmethod
    def load(cls, path: str | None) -> AgentCatalog:
        if path is None:
            text = resources.files("chatserver").joinpath("agents.toml").read_text("utf-8")
            return cls.from_toml(text, "built-in agents.toml")
        try:
            text = Path(path).read_text("utf-8")
        except OSError as exc:
            raise AgentCatalogError(f"{path}: {exc.strerror}") from None
        return cls.from_toml(text, path)
