"""Tool calls from Home Assistant's real request: the home it describes, the grammar, the checks.

The request is the one Home Assistant 2025.4.4's Ollama integration really sent
(tests/data, recorded by tests/e2e/capture_hass_ollama.py).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest

from wyoming_superwhisper.handle.home import ToolError, home_of, parse_tools
from wyoming_superwhisper.handle.ollama import (
    OllamaRequestError,
    _options,
    chat_messages,
    key_matches,
    ollama_tool_calls,
    parse_keep_alive,
    trim_history,
)
from wyoming_superwhisper.handle.toolcalls import (
    call_schema,
    parse_call,
    plain_messages,
    tool_grammar,
    validate_call,
)

DATA = Path(__file__).resolve().parents[1] / "data"


def recorded(name: str) -> dict[str, Any]:
    body: dict[str, Any] = json.loads((DATA / name).read_text())["request"]["body"]
    return body


@pytest.fixture(scope="module")
def first() -> dict[str, Any]:
    return recorded("hass-2025.4.4-ollama-chat.json")


def test_the_home_in_home_assistants_prompt_is_read(first: dict[str, Any]) -> None:
    home = home_of(chat_messages(first["messages"]), first["tools"])
    assert "Lumière de la cuisine" in home.names
    assert {"Cuisine", "Salon", "Chambre", "Bureau"} <= set(home.areas)
    assert {"light", "climate"} <= set(home.domains)
    assert home.entity("lumière de la cuisine") is not None  # case-insensitive lookup
    assert {t.name for t in home.tools} >= {"HassTurnOn", "HassTurnOff", "GetLiveContext"}


def test_the_grammar_restricts_names_to_the_exposed_ones(first: dict[str, Any]) -> None:
    home = home_of(chat_messages(first["messages"]), first["tools"])
    grammar = tool_grammar(home)
    assert grammar.startswith("root ::= ")
    assert "Lumi\\u00e8re de la cuisine" in grammar or "Lumière de la cuisine" in grammar
    schema = call_schema(home.tool("HassTurnOn"), home)  # type: ignore[arg-type]
    assert schema["properties"]["arguments"]["properties"]["name"]["enum"] == home.names
    assert "floor" not in schema["properties"]["arguments"]["properties"]
    text_only = tool_grammar(home, allow_calls=False)
    assert "HassTurnOn" not in text_only and "text" in text_only


def test_the_grammar_is_accepted_by_llama_cpp(first: dict[str, Any]) -> None:
    from llama_cpp import LlamaGrammar

    home = home_of(chat_messages(first["messages"]), first["tools"])
    LlamaGrammar.from_string(tool_grammar(home), verbose=False)  # raises on a malformed grammar


def test_calls_are_checked_against_the_home(first: dict[str, Any]) -> None:
    home = home_of(chat_messages(first["messages"]), first["tools"])
    assert validate_call("HassTurnOn", {"name": "Lumière de la cuisine"}, home) is None
    assert validate_call("HassTurnOn", '{"name": "Lumière de la cuisine"}', home) is None
    assert "not offered" in (validate_call("HassExplode", {}, home) or "")
    assert "no exposed entity" in (validate_call("HassTurnOn", {"name": "Lumière du garage"}, home) or "")
    assert "unknown argument" in (validate_call("HassTurnOn", {"colour": "red"}, home) or "")
    assert "no area" in (validate_call("HassTurnOn", {"area": "Garage"}, home) or "")
    assert "expected number" in (
        validate_call("HassClimateSetTemperature", {"temperature": "vingt"}, home) or ""
    )


def test_parse_call_tells_text_from_a_call() -> None:
    assert parse_call("D'accord.") is None
    assert parse_call('{"name": "HassTurnOn", "arguments": {"name": "X"}}') == {
        "name": "HassTurnOn",
        "arguments": {"name": "X"},
    }
    with pytest.raises(ToolError):
        parse_call('{"name": "HassTurnOn", "arguments": {"na')


def test_history_after_a_tool_call_becomes_plain_alternating_turns() -> None:
    body = recorded("hass-2025.4.4-ollama-chat-after-tool.json")
    plain = plain_messages(chat_messages(body["messages"]))
    roles = [m["role"] for m in plain]
    assert roles[0] == "system" and "tool" not in roles
    assert all(a != b for a, b in itertools.pairwise(roles[1:]))  # user/assistant alternate
    assert any('"HassTurnOn"' in m["content"] for m in plain if m["role"] == "assistant")
    assert "Résultat de l'outil" in plain[-1]["content"]


@pytest.mark.parametrize(
    ("tools", "fragment"),
    [
        ("nope", "must be a list"),
        ([{"type": "function"}], "needs a 'function'"),
        ([{"function": {"name": "bad name!"}}], "function.name"),
        ([{"function": {"name": "a"}}, {"function": {"name": "a"}}], "unique"),
        ([{"function": {"name": f"t{i}"}} for i in range(500)], "too many tools"),
    ],
)
def test_malformed_tools_are_refused_with_a_reason(tools: Any, fragment: str) -> None:
    with pytest.raises(ToolError, match=fragment):
        parse_tools(tools)


def test_a_schema_the_grammar_cannot_express_names_the_tool() -> None:
    tools = [
        {
            "function": {
                "name": "Odd",
                "parameters": {"type": "object", "properties": {"x": {"$ref": "#/nowhere"}}},
            }
        }
    ]
    with pytest.raises(ToolError, match="Odd"):
        tool_grammar(home_of([], tools))


def test_ollama_request_details() -> None:
    assert parse_keep_alive("-1.0s") == -1.0  # what Home Assistant sends
    assert parse_keep_alive("5m") == 300.0 and parse_keep_alive(0) == 0.0 and parse_keep_alive(None) is None
    with pytest.raises(OllamaRequestError, match="invalid duration"):
        parse_keep_alive("forever")
    assert _options({"num_ctx": 8192.0, "num_predict": 20, "temperature": 0, "stop": "\n"}) == {
        "num_predict": 20,
        "temperature": 0,
        "stop": ["\n"],
    }
    with pytest.raises(OllamaRequestError, match="num_ctx"):
        _options({"num_ctx": "big"})
    with pytest.raises(OllamaRequestError, match="role"):
        chat_messages([{"role": "wizard", "content": "x"}])
    calls = ollama_tool_calls([{"function": {"name": "HassTurnOn", "arguments": '{"name": "X"}'}}])
    assert calls == [{"function": {"name": "HassTurnOn", "arguments": {"name": "X"}}}]


def test_history_is_trimmed_from_the_oldest_turn() -> None:
    messages = [{"role": "system", "content": "s" * 10}] + [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"{i}" * 10} for i in range(6)
    ]
    trimmed = trim_history(messages, 40)
    assert trimmed[0]["role"] == "system" and trimmed[-1] == messages[-1]
    assert sum(len(m["content"]) for m in trimmed) <= 40 and len(trimmed) < len(messages)


def test_basic_auth_carries_the_key_for_clients_without_tokens() -> None:
    import base64

    assert key_matches("Bearer k3y", "k3y")
    assert key_matches("Basic " + base64.b64encode(b"superwhisper:k3y").decode(), "k3y")
    assert not key_matches("Basic " + base64.b64encode(b"superwhisper:nope").decode(), "k3y")
    assert not key_matches("", "k3y")


def test_a_level_that_may_not_act_answers_in_words_only(first: dict[str, Any]) -> None:
    """``tools: false`` (SmolLM2 in the catalog): no call in its grammar, a line saying so."""
    from wyoming_superwhisper.handle.engines import ChatRequest, LlamaCppEngine

    messages = chat_messages(first["messages"])
    home = home_of(messages, first["tools"])
    shared = tool_grammar(home)  # what the service builds for the chain, calls included
    request = ChatRequest(messages, tools=first["tools"], language="fr", grammar=shared)
    acting = LlamaCppEngine(Path("unused.gguf"), ref="big")
    _, grammar = acting._tool_setup(request)
    assert grammar == shared and "t0-root" in grammar
    words_only = LlamaCppEngine(Path("unused.gguf"), ref="tiny", options={"tools": False})
    plain, grammar = words_only._tool_setup(request)
    assert grammar is not None and "t0-root" not in grammar and grammar.startswith("root ::= text")
    assert "n'as pas compris quel appareil" in plain[0]["content"]
    assert not any('"name"' in str(m.get("content")) for m in plain[1:]), "no example calls to copy"
    english = ChatRequest(messages, tools=first["tools"], language="en", grammar=shared)
    assert "did not understand which device" in words_only._tool_setup(english)[0][0]["content"]
