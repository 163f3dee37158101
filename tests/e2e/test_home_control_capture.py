"""Home control through a real Home Assistant: its intents act on the French home, and its
Ollama integration executes the tool calls an Ollama server answers.

A real Home Assistant Core 2025.4.4 (.venv-hass) with the French home of ``hass.py``
(12 entities, 4 areas, exposed to Assist) and its Ollama integration set up through
the config and options flows, pointed at a recording stub (``ollama_stub.py``) whose
answers the test scripts. What is under test is Home Assistant's side of the
contract our handle server's Ollama-compatible API relies on:

- the home is right for French intents: Home Assistant's own agent turns the named
  things on and off, sets a brightness and the heating's target;
- a tool call answered in Ollama's format (the arguments our model gives) is executed
  by Home Assistant: the state changes, and the next ``/api/chat`` carries the result;
- what Home Assistant sends still has the shape of the recorded fixtures
  (``tests/data/hass-2025.4.4-ollama-chat*.json``, ``capture_hass_ollama.py``), on
  which the unit tests of our API rely.

No model runs: Home Assistant starts and is set up in ~10 s, each test takes well
under a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest

from .capture_hass_ollama import AFTER_TOOL, FIRST
from .hass import (
    DEFAULT_AGENT,
    HOME,
    HOME_AREAS,
    REQUIRES_HASS,
    HassInstance,
    HassWebSocket,
    OllamaAgent,
    add_ollama_agent,
    build_french_home,
    call_service,
    converse,
    get_state,
    home_assistant,
    onboard_owner,
    reset_home,
    speech_of,
)
from .ollama_stub import MODEL, ChatReply, OllamaStub, ollama_stub

pytestmark = REQUIRES_HASS


@dataclass
class Home:
    hass: HassInstance
    stub: OllamaStub
    token: str
    agent: OllamaAgent
    areas: dict[str, str]

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[tuple[aiohttp.ClientSession, HassWebSocket]]:
        async with (
            aiohttp.ClientSession() as session,
            HassWebSocket.connect(session, self.hass.url, self.token) as ws,
        ):
            yield session, ws

    async def state(self, session: aiohttp.ClientSession, entity_id: str) -> dict[str, Any]:
        return await get_state(session, self.hass.url, self.token, entity_id)


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Home]:
    """Home Assistant with the French home and an Ollama agent on the stub; always stopped."""
    root = tmp_path_factory.mktemp("hass-home")
    with ollama_stub() as stub, home_assistant(root / "hass-config", home=True) as hass:
        started = time.monotonic()
        ready = hass.wait_ready()

        async def setup() -> tuple[str, dict[str, str], OllamaAgent]:
            async with aiohttp.ClientSession() as session:
                token = await onboard_owner(session, hass.url)
                async with HassWebSocket.connect(session, hass.url, token) as ws:
                    areas = await build_french_home(ws)
                agent = await add_ollama_agent(session, hass.url, token, stub.url, MODEL)
                return token, areas, agent

        token, areas, agent = asyncio.run(setup())
        print(
            f"\n[timing] Home Assistant answering after {ready:.1f} s; home built and Ollama agent"
            f" {agent.entity_id} set up after {time.monotonic() - started:.1f} s"
        )
        try:
            yield Home(hass, stub, token, agent, areas)
        finally:
            print(f"[logs] {hass.config_dir / 'home-assistant.log'}")


@pytest.fixture
async def fresh(home: Home) -> Home:
    """The home back to its start state and the stub's record empty, before each test."""
    async with aiohttp.ClientSession() as session:
        await reset_home(session, home.hass.url, home.token)
    home.stub.clear()
    return home


# --- the home itself ------------------------------------------------------------------------


async def test_the_home_is_in_its_areas_and_exposed(fresh: Home) -> None:
    assert set(fresh.areas) == set(HOME_AREAS)
    async with fresh.session() as (_, ws):
        registry = {e["entity_id"]: e for e in await ws.call("config/entity_registry/list")}
        exposed = await ws.call("homeassistant/expose_entity/list")
    for entity in HOME:
        assert registry[entity.entity_id]["area_id"] == fresh.areas[entity.area], entity
        assert exposed["exposed_entities"][entity.entity_id].get("conversation") is True, entity
    # The helpers behind the entities stay hidden from Assist.
    helpers = [e for e in exposed["exposed_entities"] if e.startswith(("input_boolean.", "input_number."))]
    assert not any(exposed["exposed_entities"][e].get("conversation") for e in helpers)
    log = fresh.hass.log()
    for sign in ("Setup failed for", "No module named", "Unable to install package", "Invalid config"):
        assert sign not in log, f"Home Assistant logged {sign!r}"


@dataclass(frozen=True)
class Command:
    text: str
    entity_id: str
    expect: dict[str, Any]
    """``state`` and/or attributes the entity must have afterwards."""
    before: tuple[str, str, dict[str, Any]] | None = None
    """A service called first (domain, service, data), to start from another state."""
    also: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Other entities' expectations."""


DEFAULT_AGENT_COMMANDS = [
    Command("Allume la lumière de la cuisine", "light.lumiere_cuisine", {"state": "on"}),
    Command("Mets le chauffage à 21 degrés", "climate.chauffage", {"temperature": 21}),
    Command("Allume la lampe du salon", "light.lampe_salon", {"state": "on"}),
    Command(
        "Éteins la lumière de la chambre",
        "light.lumiere_chambre",
        {"state": "off"},
        before=("light", "turn_on", {"entity_id": "light.lumiere_chambre"}),
    ),
    Command("Règle la lumière du bureau à 50 %", "light.lumiere_bureau", {"state": "on", "brightness": 128}),
    Command("Allume la prise du bureau", "switch.prise_bureau", {"state": "on"}),
    Command("Allume la cafetière", "switch.cafetiere", {"state": "on"}),
    Command("Allume le ventilateur de la chambre", "fan.ventilateur_chambre", {"state": "on"}),
    Command("Ouvre le volet du salon", "cover.volet_salon", {"state": "open", "current_position": 100}),
    Command(
        "Allume les lumières du salon",
        "light.lumiere_salon",
        {"state": "on"},
        also={"light.lampe_salon": {"state": "on"}, "light.lumiere_cuisine": {"state": "off"}},
    ),
]


def _check(state: dict[str, Any], expect: dict[str, Any]) -> list[str]:
    wrong = []
    for key, value in expect.items():
        got = state["state"] if key == "state" else state["attributes"].get(key)
        if got != value:
            wrong.append(f"{state['entity_id']}.{key} = {got!r}, not {value!r}")
    return wrong


async def _run_command(home: Home, command: Command, agent_id: str) -> dict[str, Any]:
    async with home.session() as (session, ws):
        if command.before is not None:
            domain, service, data = command.before
            await call_service(session, home.hass.url, home.token, domain, service, data)
        result = await converse(ws, command.text, agent_id, "fr")
        wrong: list[str] = []
        for entity_id, expect in {command.entity_id: command.expect, **command.also}.items():
            wrong += _check(await home.state(session, entity_id), expect)
    assert not wrong, f"{command.text!r} → {speech_of(result)!r}: {wrong}"
    return result


@pytest.mark.parametrize("command", DEFAULT_AGENT_COMMANDS, ids=lambda c: c.text)
async def test_home_assistants_own_agent_controls_the_home_in_french(fresh: Home, command: Command) -> None:
    """The control: names, areas and entity features right for Home Assistant's French intents."""
    result = await _run_command(fresh, command, DEFAULT_AGENT)
    assert result["response"]["response_type"] == "action_done", result
    print(f"\n[result] {command.text!r} → {speech_of(result)!r}")


# --- the Ollama agent: Home Assistant executes the tool calls -----------------------------------


TOOL_COMMANDS = [
    (
        ChatReply.tool_call("HassTurnOn", {"name": "Lumière de la cuisine"}),
        Command("Allume la lumière de la cuisine", "light.lumiere_cuisine", {"state": "on"}),
    ),
    (
        ChatReply.tool_call("HassTurnOn", {"area": "Salon", "domain": ["light"]}),
        Command(
            "Allume les lumières du salon",
            "light.lumiere_salon",
            {"state": "on"},
            also={"light.lampe_salon": {"state": "on"}, "light.lumiere_cuisine": {"state": "off"}},
        ),
    ),
    (
        ChatReply.tool_call("HassTurnOff", {"name": "Lumière de la chambre"}),
        Command(
            "Éteins la lumière de la chambre",
            "light.lumiere_chambre",
            {"state": "off"},
            before=("light", "turn_on", {"entity_id": "light.lumiere_chambre"}),
        ),
    ),
    (
        ChatReply.tool_call("HassLightSet", {"name": "Lumière du bureau", "brightness": 50}),
        Command(
            "Mets la lumière du bureau à 50 %", "light.lumiere_bureau", {"state": "on", "brightness": 128}
        ),
    ),
    (
        ChatReply.tool_call("HassClimateSetTemperature", {"name": "Chauffage", "temperature": 21}),
        Command("Mets le chauffage à 21 degrés", "climate.chauffage", {"temperature": 21}),
    ),
    (
        ChatReply.tool_call("HassSetPosition", {"name": "Volet du salon", "position": 40}),
        Command("Ouvre le volet du salon à 40 %", "cover.volet_salon", {"current_position": 40}),
    ),
]


@pytest.mark.parametrize(("tool_call", "command"), TOOL_COMMANDS, ids=[c.text for _, c in TOOL_COMMANDS])
async def test_home_assistant_executes_an_ollama_tool_call(
    fresh: Home, tool_call: ChatReply, command: Command
) -> None:
    """The stub answers a tool call, then a sentence: the state changes, the sentence is spoken."""
    final = "C'est fait."
    fresh.stub.script(tool_call, ChatReply(final))
    result = await _run_command(fresh, command, fresh.agent.entity_id)
    assert speech_of(result) == final, result
    chats = fresh.stub.recorded("/api/chat")
    assert len(chats) == 2, fresh.stub.calls()
    messages = chats[1].body["messages"]
    assert messages[-2] == {"role": "assistant", "tool_calls": list(tool_call.tool_calls)}
    assert messages[-1]["role"] == "tool"
    tool_result = json.loads(messages[-1]["content"])
    assert tool_result["response_type"] == "action_done", tool_result
    assert command.entity_id in [t["id"] for t in tool_result["data"]["success"]], tool_result
    print(f"\n[result] {tool_call.tool_calls[0]['function']} → {tool_result['data']['success']}")


async def test_a_tool_call_on_an_unknown_name_comes_back_as_an_error_result(fresh: Home) -> None:
    """A name the home does not have: no state changes, the model gets the error to answer from."""
    fresh.stub.script(
        ChatReply.tool_call("HassTurnOn", {"name": "Lumière du grenier"}), ChatReply("Je ne trouve pas.")
    )
    async with fresh.session() as (session, ws):
        result = await converse(ws, "Allume la lumière du grenier", fresh.agent.entity_id, "fr")
        states = [(await fresh.state(session, e.entity_id))["state"] for e in HOME if e.domain == "light"]
    assert speech_of(result) == "Je ne trouve pas."
    assert set(states) == {"off"}
    chats = fresh.stub.recorded("/api/chat")
    assert len(chats) == 2, fresh.stub.calls()
    tool_message = chats[1].body["messages"][-1]
    assert tool_message["role"] == "tool"
    tool_result = json.loads(tool_message["content"])
    print(f"\n[result] the tool result for an unknown name: {tool_result}")
    assert "error" in tool_result, tool_result


# --- the recorded fixtures still match what Home Assistant sends ---------------------------------

_TIME_LINE = re.compile(r"^Current time is \d\d:\d\d:\d\d\. Today's date is \d{4}-\d\d-\d\d\.$", re.MULTILINE)


def _comparable(body: dict[str, Any]) -> dict[str, Any]:
    """A request body without what changes from run to run: the time line of the prompt,
    the order of the devices in its static context and the order of the tools (the
    orders Home Assistant's platforms and intents happened to be set up in: not the
    same from one start to the next, measured)."""
    body = json.loads(json.dumps(body))
    body["tools"] = sorted(body.get("tools") or [], key=lambda tool: str(tool["function"]["name"]))
    for message in body["messages"]:
        if message["role"] == "system":
            text = _TIME_LINE.sub("Current time is <time>. Today's date is <date>.", message["content"])
            head, *devices = text.rstrip("\n").split("\n- names: ")
            message["content"] = "\n- names: ".join([head, *sorted(devices)])
    return body


async def test_home_assistant_sends_what_the_fixtures_recorded(fresh: Home) -> None:
    """The same command as ``capture_hass_ollama.py``: the same two /api/chat bodies (the
    time aside), the same headers. A change here means the fixtures need recapturing."""
    recorded = [json.loads(path.read_text()) for path in (FIRST, AFTER_TOOL)]
    fresh.stub.script(
        ChatReply.tool_call("HassTurnOn", {"name": "Lumière de la cuisine"}),
        ChatReply("J'ai allumé la lumière de la cuisine."),
    )
    async with fresh.session() as (session, ws):
        result = await converse(ws, "Allume la lumière de la cuisine", fresh.agent.entity_id, "fr")
        light = await fresh.state(session, "light.lumiere_cuisine")
    assert light["state"] == "on", result
    chats = fresh.stub.recorded("/api/chat")
    assert [c.path for c in chats] == ["/api/chat", "/api/chat"], fresh.stub.calls()
    for chat, fixture in zip(chats, recorded, strict=True):
        assert _TIME_LINE.search(chat.body["messages"][0]["content"]), chat.body["messages"][0]
        assert _comparable(chat.body) == _comparable(fixture["request"]["body"])
        skip = {"Host", "Content-Length"}
        assert {k: v for k, v in chat.headers.items() if k not in skip} == {
            k: v for k, v in fixture["request"]["headers"].items() if k not in skip
        }
    # Setup asks for the model list only: no /api/version, no /api/show.
    assert set(recorded[0]["calls"]) == {"GET /api/tags", "POST /api/chat"}, recorded[0]["calls"]
