"""The agent catalogue: a TOML file shipped in the package, overridable with --agents."""

from __future__ import annotations

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
}


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
    if int(entry.get("max_output_tokens", 1024)) < 1:
        raise AgentCatalogError(f"{where}: 'max_output_tokens' must be positive")
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
