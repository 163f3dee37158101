"""Tool calls a small local model gets right: a grammar, a short prompt, a strict check.

A 135M-parameter model asked for JSON writes prose, half a brace, or the name
of a light that does not exist. So when tools are offered, llama.cpp samples
under a GBNF grammar built here: the answer is either plain text (it may not
start with ``{``) or exactly one call ``{"name": <an offered tool>,
"arguments": {...}}`` whose arguments follow that tool's JSON schema, with the
entity ``name`` and ``area`` restricted to the ones Home Assistant exposed
(parsed from its prompt by :mod:`.home`). The model only has to *choose*.

Models without a grammar (the remote level, the GPU model served elsewhere)
are held to the same :func:`validate_call`: a call to a tool nobody offered or
naming an unknown light is rejected, and the chain's next level answers.

Chat templates of small models know ``system``/``user``/``assistant`` only;
:func:`plain_messages` rewrites tool calls and results into those roles.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from .home import Home, Tool, ToolError

_LOGGER = logging.getLogger(__name__)

MAX_GRAMMAR_CHARS = 200_000
"""A grammar larger than this (thousands of entities × tools) is refused: llama.cpp's
sampler would spend more time in the grammar than in the model."""

_TEXT_RULES = r"""
text ::= [^{ \t\n] [^\x00]*
"""


def _constrain(prop: str, schema: Mapping[str, Any], home: Home) -> Mapping[str, Any] | None:
    """One argument's schema, narrowed to this home (None: leave the argument out)."""
    if prop == "name" and schema.get("type") == "string" and home.names:
        return {"type": "string", "enum": home.names}
    if prop == "area" and schema.get("type") == "string":
        return {"type": "string", "enum": home.areas} if home.areas else None
    if prop == "floor" and schema.get("type") == "string":
        return None  # Home Assistant's prompt lists no floors: the model could only invent one
    if prop == "domain" and home.domains:
        items = schema.get("items") if schema.get("type") == "array" else schema
        allowed = list(items.get("enum", home.domains)) if isinstance(items, Mapping) else home.domains
        domains = [d for d in home.domains if d in allowed]
        if not domains:
            return None
        if schema.get("type") == "array":
            return {
                "type": "array",
                "items": {"type": "string", "enum": domains},
                "minItems": 1,
                "maxItems": 1,
            }
        return {"type": "string", "enum": domains}
    return schema


def call_schema(tool: Tool, home: Home) -> dict[str, Any]:
    """JSON schema of one call ``{"name": tool, "arguments": {...}}`` in this home."""
    properties: dict[str, Any] = {}
    for prop, schema in tool.properties.items():
        if not isinstance(schema, Mapping):
            raise ToolError(f"tool {tool.name}: parameter {prop!r} has no JSON schema")
        narrowed = _constrain(prop, schema, home)
        if narrowed is not None:
            properties[prop] = dict(narrowed)
    required = [r for r in tool.parameters.get("required", []) or [] if r in properties]
    missing = [r for r in tool.parameters.get("required", []) or [] if r not in properties]
    if missing:
        raise ToolError(f"tool {tool.name}: required parameter(s) {missing} cannot be filled in this home")
    arguments: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        arguments["required"] = required
    return {
        "type": "object",
        "properties": {"name": {"const": tool.name}, "arguments": arguments},
        "required": ["name", "arguments"],
    }


def tool_grammar(home: Home, *, allow_text: bool = True, allow_calls: bool = True) -> str:
    """GBNF for an answer: text, or one call of an offered tool (see the module docstring).

    Raises :class:`ToolError` naming the tool whose schema llama.cpp's converter
    cannot express, or when the grammar would be unreasonably large.
    """
    from llama_cpp.llama_grammar import json_schema_to_gbnf  # pure Python, no native load

    alternatives: list[str] = []
    rules: list[str] = []
    if allow_calls:
        for index, tool in enumerate(home.tools):
            try:
                gbnf = json_schema_to_gbnf(
                    json.dumps(call_schema(tool, home)), prop_order=["name", "arguments"]
                )
            except ToolError:
                raise
            except Exception as error:  # the converter raises bare Exceptions and asserts
                raise ToolError(
                    f"tool {tool.name}: its parameters cannot be expressed as a grammar ({error})"
                ) from error
            prefix = f"t{index}-"
            renamed = _prefix_rules(gbnf, prefix)
            alternatives.append(f"{prefix}root")
            rules.append(renamed)
    if allow_text:
        alternatives.append("text")
        rules.append(_TEXT_RULES)
    if not alternatives:
        raise ToolError("nothing to answer with: no tools and no text")
    grammar = "root ::= " + " | ".join(alternatives) + "\n" + "\n".join(rules)
    if len(grammar) > MAX_GRAMMAR_CHARS:
        raise ToolError(
            f"tools too large for a grammar ({len(grammar)} characters > {MAX_GRAMMAR_CHARS}): "
            "expose fewer entities or offer fewer tools"
        )
    return grammar


def _prefix_rules(gbnf: str, prefix: str) -> str:
    """Rename every rule of a converted schema, so several converted schemas share one grammar."""
    names = {line.split("::=", 1)[0].strip() for line in gbnf.splitlines() if "::=" in line}
    out: list[str] = []
    for line in gbnf.splitlines():
        if "::=" not in line:
            continue
        head, body = line.split("::=", 1)
        out.append(f"{prefix}{head.strip()} ::={_rename_refs(body, names, prefix)}")
    return "\n".join(out)


def _rename_refs(body: str, names: set[str], prefix: str) -> str:
    """Prefix rule references in a rule body, leaving quoted literals and classes alone."""
    result: list[str] = []
    i = 0
    while i < len(body):
        char = body[i]
        if char == '"':
            end = i + 1
            while end < len(body) and body[end] != '"':
                end += 2 if body[end] == "\\" else 1
            result.append(body[i : end + 1])
            i = end + 1
        elif char == "[":
            end = i + 1
            while end < len(body) and body[end] != "]":
                end += 2 if body[end] == "\\" else 1
            result.append(body[i : end + 1])
            i = end + 1
        elif char.isalpha():
            end = i
            while end < len(body) and (body[end].isalnum() or body[end] in "-_"):
                end += 1
            word = body[i:end]
            result.append(prefix + word if word in names else word)
            i = end
        else:
            result.append(char)
            i += 1
    return "".join(result)


def tools_prompt(home: Home, language: str) -> str:
    """Short instructions for calling: one line per tool, and one worked example from this home."""
    lines = [
        "Pour agir sur la maison, réponds uniquement par un objet JSON "
        '{"name": <outil>, "arguments": {...}}. Sinon, réponds par une phrase.'
        if language != "en"
        else "To act on the home, answer only with a JSON object "
        '{"name": <tool>, "arguments": {...}}. Otherwise answer with a sentence.',
        "Outils :" if language != "en" else "Tools:",
    ]
    for tool in home.tools:
        params = ", ".join(tool.properties)
        description = tool.description.split(". ")[0][:120]
        lines.append(f"- {tool.name}({params}): {description}")
    return "\n".join(lines)


def words_only_prompt(language: str) -> str:
    """For a level that may not act (``tools: false``): answer questions, never claim an action."""
    if language == "en":
        return (
            "You cannot control devices yourself. If asked to control a device, say in one short "
            "sentence that you did not understand which device, and ask the user to repeat."
        )
    return (
        "Tu ne peux pas commander les appareils toi-même. Si on te demande d'agir sur un appareil, "
        "dis en une phrase courte que tu n'as pas compris quel appareil, et demande de répéter."
    )


def example_turns(home: Home, language: str) -> list[dict[str, str]]:
    """Worked examples as chat turns, drawn from this home (tiny models copy turns, not rules).

    Measured with SmolLM2-135M: with the rule alone it answered "Allume la lumière
    de la cuisine" in prose; with these turns before the request, with a call.
    """
    switchable = [e for e in home.entities if e.domain in ("light", "switch", "fan")]
    turns: list[dict[str, str]] = []
    pairs = (
        ("HassTurnOn", "Allume" if language != "en" else "Turn on", 0),
        ("HassTurnOff", "Éteins" if language != "en" else "Turn off", -1),
    )
    for tool, verb, pick in pairs:
        if home.tool(tool) is None or not switchable:
            continue
        entity = switchable[pick]
        call = {"name": tool, "arguments": {"name": entity.name}}
        turns.append({"role": "user", "content": f"{verb} {entity.name[:1].lower()}{entity.name[1:]}"})
        turns.append({"role": "assistant", "content": json.dumps(call, ensure_ascii=False)})
    if turns:
        question, answer = (
            ("Bonjour, comment vas-tu ?", "Très bien, merci ! Que puis-je faire pour vous ?")
            if language != "en"
            else ("Hello, how are you?", "Very well, thank you! What can I do for you?")
        )
        turns += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return turns


def after_tool_result(messages: Sequence[Mapping[str, Any]]) -> bool:
    """True when the last message is a tool's result: the model now says what happened."""
    return bool(messages) and messages[-1].get("role") == "tool"


def plain_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Tool calls and results as ordinary turns, adjacent turns of one role merged.

    An assistant call becomes its JSON (what the grammar makes the model write);
    a tool result becomes a user turn that says so. Templates that insist on
    alternating user/assistant turns (Gemma's) then accept every history.
    """
    out: list[dict[str, Any]] = []
    for message in messages:
        role = str(message.get("role") or "user")
        content = message.get("content")
        text = content if isinstance(content, str) else _parts_text(content)
        if role == "assistant" and message.get("tool_calls"):
            calls = [_call_json(call) for call in message["tool_calls"] or []]
            text = "\n".join(filter(None, [text, *calls]))
        elif role == "tool":
            role = "user"
            text = f"[Résultat de l'outil] {text}"
        elif role not in ("system", "user", "assistant"):
            role = "user"
        if out and out[-1]["role"] == role and role != "system":
            out[-1]["content"] += "\n" + text
        else:
            out.append({"role": role, "content": text})
    return out


def _parts_text(content: Any) -> str:
    if isinstance(content, list):
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, Mapping))
    return "" if content is None else str(content)


def _call_json(call: Mapping[str, Any]) -> str:
    function = call.get("function") if isinstance(call, Mapping) else None
    if not isinstance(function, Mapping):
        return ""
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            arguments = {}
    return json.dumps({"name": function.get("name"), "arguments": arguments or {}}, ensure_ascii=False)


def openai_tool_call(name: str, arguments: Mapping[str, Any], index: int = 0) -> dict[str, Any]:
    """One call in OpenAI's shape (arguments a JSON string), as every front door passes it on."""
    return {
        "index": index,
        "id": f"call_{uuid.uuid4().hex[:12]}",
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(dict(arguments), ensure_ascii=False)},
    }


def parse_call(text: str) -> dict[str, Any] | None:
    """The model's output → ``{"name", "arguments"}`` when it is a call; None when it is text."""
    stripped = text.strip()
    if not stripped.startswith("{"):
        return None
    try:
        value = json.loads(stripped)
    except ValueError as error:
        raise ToolError(f"the call is not valid JSON ({error})") from error
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        raise ToolError("the call has no tool name")
    arguments = value.get("arguments", {})
    if not isinstance(arguments, dict):
        raise ToolError("the call's arguments are not an object")
    return {"name": value["name"], "arguments": arguments}


def validate_call(name: str, arguments: Any, home: Home) -> str | None:
    """Why a call cannot be executed in this home (None: it can).

    Checks the tool is offered, the arguments are an object of declared
    parameters with the declared JSON types, enums are respected, and entity
    names and areas exist. What a grammar guarantees, checked for every model.
    """
    tool = home.tool(name)
    if tool is None:
        return f"tool {name!r} was not offered"
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments or "{}")
        except ValueError:
            return f"{name}: arguments are not valid JSON"
    if not isinstance(arguments, Mapping):
        return f"{name}: arguments are not an object"
    properties = tool.properties
    for required in tool.parameters.get("required", []) or []:
        if required not in arguments:
            return f"{name}: required argument {required!r} missing"
    for key, value in arguments.items():
        schema = properties.get(key)
        if not isinstance(schema, Mapping):
            return f"{name}: unknown argument {key!r}"
        problem = _type_problem(value, schema)
        if problem:
            return f"{name}.{key}: {problem}"
        if key == "name" and home.entities and home.entity(str(value)) is None:
            return f"{name}: no exposed entity is called {value!r}"
        if (
            key == "area"
            and home.entities
            and str(value).casefold() not in {a.casefold() for a in home.areas}
        ):
            return f"{name}: no area is called {value!r}"
    return None


_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "array": (list,),
    "object": (dict,),
}


def _type_problem(value: Any, schema: Mapping[str, Any]) -> str | None:
    kind = schema.get("type")
    if isinstance(kind, str) and kind in _JSON_TYPES:
        if isinstance(value, bool) and kind in ("integer", "number"):
            return f"expected {kind}, got a boolean"
        if not isinstance(value, _JSON_TYPES[kind]):
            return f"expected {kind}, got {type(value).__name__}"
    enum = schema.get("enum")
    if isinstance(enum, list) and value not in enum:
        return f"{value!r} is not one of {enum[:8]}"
    if kind == "array" and isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        for item in value:
            problem = _type_problem(item, schema["items"])
            if problem:
                return problem
    for bound, check in (("minimum", lambda v, b: v < b), ("maximum", lambda v, b: v > b)):
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        if bound in schema and numeric and check(value, schema[bound]):
            return f"{value} is outside [{schema.get('minimum')}, {schema.get('maximum')}]"
    return None
