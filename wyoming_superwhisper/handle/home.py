"""What Home Assistant tells the model about the home: exposed entities and the tools.

Home Assistant's LLM API (its "Assist" API, handed to the model by the Ollama
and OpenAI integrations) puts the exposed entities in the system prompt as a
YAML list after "An overview of the areas and the devices in this smart
home:" (``names``, ``domain``, ``areas``, and in live context ``state`` and
``attributes``), and offers its intents as tools (``HassTurnOn``,
``HassLightSet``, ``GetLiveContext``...). Parsed here once, so the grammar
that constrains a call, the intent matcher and the tool executor of the MCP
path all agree on which names exist.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

_LOGGER = logging.getLogger(__name__)

_OVERVIEW = re.compile(r"overview of the areas and the devices in this smart home:\s*\n", re.IGNORECASE)
MAX_TOOLS = 128
"""Tools accepted in one request (Home Assistant 2025.4 offers about 15)."""


class ToolError(ValueError):
    """A ``tools`` list the server cannot use (the API answers 400 with this text)."""


@dataclass(frozen=True)
class ExposedEntity:
    """One entity as Home Assistant describes it to the model."""

    names: tuple[str, ...]
    """Its name first, then its aliases."""
    domain: str
    areas: tuple[str, ...] = ()
    state: str | None = None
    attributes: Mapping[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.names[0]


@dataclass(frozen=True)
class Tool:
    """One offered function: its name, description and JSON-schema parameters."""

    name: str
    description: str = ""
    parameters: Mapping[str, Any] = field(default_factory=dict)

    @property
    def properties(self) -> Mapping[str, Any]:
        props = self.parameters.get("properties")
        return props if isinstance(props, Mapping) else {}


@dataclass(frozen=True)
class Home:
    """The exposed entities (from the prompt) and the offered tools (from the request)."""

    entities: tuple[ExposedEntity, ...] = ()
    tools: tuple[Tool, ...] = ()

    @property
    def names(self) -> list[str]:
        """Every entity name and alias, in prompt order, without repeats."""
        return _unique(n for e in self.entities for n in e.names)

    @property
    def areas(self) -> list[str]:
        return _unique(a for e in self.entities for a in e.areas)

    @property
    def domains(self) -> list[str]:
        return _unique(e.domain for e in self.entities)

    def tool(self, name: str) -> Tool | None:
        return next((t for t in self.tools if t.name == name), None)

    def entity(self, name: str) -> ExposedEntity | None:
        """The entity called ``name`` (case and accents as written, then case-insensitively)."""
        folded = name.casefold().strip()
        for entity in self.entities:
            if name in entity.names:
                return entity
        return next((e for e in self.entities if folded in (n.casefold() for n in e.names)), None)


def _unique(items: Iterable[str]) -> list[str]:
    seen: dict[str, None] = {}
    for item in items:
        if item and item not in seen:
            seen[item] = None
    return list(seen)


def parse_tools(raw: Any) -> tuple[Tool, ...]:
    """OpenAI/Ollama ``tools`` → :class:`Tool`; :class:`ToolError` names what is wrong."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ToolError("'tools' must be a list")
    if len(raw) > MAX_TOOLS:
        raise ToolError(f"too many tools ({len(raw)} > {MAX_TOOLS})")
    tools: list[Tool] = []
    for index, item in enumerate(raw):
        function = item.get("function") if isinstance(item, Mapping) else None
        if not isinstance(function, Mapping):
            raise ToolError(f"tools[{index}] needs a 'function' object")
        name = function.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", name):
            raise ToolError(f"tools[{index}].function.name must be 1-64 letters, digits, '_', '-' or '.'")
        parameters = function.get("parameters", {}) or {}
        if not isinstance(parameters, Mapping):
            raise ToolError(f"tools[{index}].function.parameters must be a JSON schema object")
        description = function.get("description") or ""
        if not isinstance(description, str):
            raise ToolError(f"tools[{index}].function.description must be a string")
        tools.append(Tool(name, description, dict(parameters)))
    if len({t.name for t in tools}) != len(tools):
        raise ToolError("tool names must be unique")
    return tuple(tools)


def exposed_entities(messages: Sequence[Mapping[str, Any]]) -> tuple[ExposedEntity, ...]:
    """The entities listed in the conversation, newest listing winning (live context has states).

    Looks in the system prompt (Home Assistant's static overview) and in tool
    results (``GetLiveContext``'s live overview); anything unparsable is skipped
    with a debug line: a prompt without a home is an ordinary chat.
    """
    found: dict[str, ExposedEntity] = {}
    for message in messages:
        content = message.get("content")
        if not isinstance(content, str) or "smart home:" not in content:
            continue
        if message.get("role") == "tool":
            try:
                result = json.loads(content)
            except ValueError:
                result = None
            if isinstance(result, Mapping) and isinstance(result.get("result"), str):
                content = result["result"]
        for entity in _entities_in(content):
            found[entity.name] = entity
    return tuple(found.values())


def _entities_in(text: str) -> list[ExposedEntity]:
    match = _OVERVIEW.search(text)
    if match is None:
        return []
    block = text[match.end() :]
    lines = block.splitlines()
    kept: list[str] = []
    for line in lines:  # the YAML list ends at the first line that is not part of it
        if kept and line and not line.startswith(("- ", "  ")):
            break
        kept.append(line)
    try:
        data = yaml.safe_load("\n".join(kept))
    except yaml.YAMLError as error:
        _LOGGER.debug("home: overview is not YAML: %s", error)
        return []
    if not isinstance(data, list):
        return []
    entities: list[ExposedEntity] = []
    for item in data:
        if not isinstance(item, Mapping):
            continue
        names = [n.strip() for n in str(item.get("names") or "").split(",") if n.strip()]
        if not names or not isinstance(item.get("domain"), str):
            continue
        areas = tuple(a.strip() for a in str(item.get("areas") or "").split(",") if a.strip())
        state = item.get("state")
        attributes = item.get("attributes")
        entities.append(
            ExposedEntity(
                names=tuple(names),
                domain=item["domain"],
                areas=areas,
                state=None if state is None else str(state),
                attributes=dict(attributes) if isinstance(attributes, Mapping) else {},
            )
        )
    return entities


def home_of(messages: Sequence[Mapping[str, Any]], tools: Any) -> Home:
    """The :class:`Home` of one request (raises :class:`ToolError` for bad ``tools``)."""
    return Home(entities=exposed_entities(messages), tools=parse_tools(tools))
