"""The MCP path of the Wyoming handle without a Home Assistant: conversions, errors, rounds.

``tests/data/hass-2025.4.4-mcp.json`` is what a real Home Assistant 2025.4.4's
``mcp_server`` answered to ``tools/list`` and ``prompts/get`` for the French
home of the e2e tests. The real server is driven in
``tests/e2e/test_home_control_mcp.py``; here Home Assistant's side of one
session is a recorder that answers as it did, and everything of ours is real:
the service's fast path (Home Assistant's sentence templates), the grammar,
``validate_call``, the conversation memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from mcp import types
from wyoming.asr import Transcript
from wyoming.client import AsyncTcpClient
from wyoming.event import Event
from wyoming.info import Describe, Info

from wyoming_superwhisper.doctor import Report, Status, check_services
from wyoming_superwhisper.handle.engines import ChatDelta, ChatEngine, ChatRequest
from wyoming_superwhisper.handle.home import exposed_entities, home_of, parse_tools
from wyoming_superwhisper.handle.mcp_home import (
    HomeControl,
    HomeSnapshot,
    HomeUnavailable,
    McpHome,
    classify_failure,
    openai_tools,
    prompt_text,
    spoken_error,
    system_with_home,
    tool_result_content,
)
from wyoming_superwhisper.handle.service import HandleService
from wyoming_superwhisper.handle.toolcalls import openai_tool_call, tool_grammar
from wyoming_superwhisper.runtime.fallback import AllLevelsFailed

from ..conftest import LOOPBACK, make_context, make_settings

RECORDED = json.loads((Path(__file__).parents[1] / "data" / "hass-2025.4.4-mcp.json").read_text())
DONE = {"speech": {}, "response_type": "action_done", "data": {"targets": [], "failed": []}}


def recorded_tools() -> list[types.Tool]:
    return [types.Tool.model_validate(tool) for tool in RECORDED["tools"]]


def recorded_prompt() -> str:
    return prompt_text(types.GetPromptResult.model_validate(RECORDED["prompt"]))


# --- MCP → the shapes respond() takes ------------------------------------------------------


def test_home_assistants_mcp_tools_become_openai_tools_the_grammar_accepts() -> None:
    tools = openai_tools(recorded_tools())
    names = [t["function"]["name"] for t in tools]
    assert names == [t["name"] for t in RECORDED["tools"]]
    assert {"HassTurnOn", "HassTurnOff", "HassClimateSetTemperature", "GetLiveContext"} <= set(names)
    turn_on = next(t for t in tools if t["function"]["name"] == "HassTurnOn")
    assert turn_on["type"] == "function"
    assert turn_on["function"]["description"] == "Turns on/opens a device or entity"
    assert turn_on["function"]["parameters"]["type"] == "object"
    assert set(turn_on["function"]["parameters"]["properties"]) >= {"name", "area", "domain"}
    live = next(t for t in tools if t["function"]["name"] == "GetLiveContext")
    assert live["function"]["parameters"] == {"type": "object", "properties": {}}

    messages = [{"role": "system", "content": recorded_prompt()}, {"role": "user", "content": "Allume"}]
    home = home_of(messages, tools)
    assert [t.name for t in home.tools] == names
    grammar = tool_grammar(home)  # every Home Assistant schema must be expressible
    assert "Chauffage" in grammar and "Cuisine" in grammar and "HassClimateSetTemperature" in grammar


def test_a_tool_without_a_name_is_dropped_and_a_schema_without_type_gets_one() -> None:
    tools = openai_tools(
        [
            types.Tool(name="Plain", inputSchema={"properties": {"x": {"type": "string"}}}),
            types.Tool.model_construct(name="", inputSchema={}),
        ]
    )
    assert [t["function"]["name"] for t in tools] == ["Plain"]
    assert tools[0]["function"]["parameters"] == {"type": "object", "properties": {"x": {"type": "string"}}}
    assert parse_tools(tools)[0].properties == {"x": {"type": "string"}}


def test_the_assist_prompt_lists_the_french_home() -> None:
    prompt = recorded_prompt()
    assert prompt.startswith("When controlling Home Assistant always call the intent tools.")
    entities = exposed_entities([{"role": "system", "content": system_with_home("Tu es Jarvis.", prompt)}])
    assert len(entities) == 12
    assert {e.areas[0] for e in entities} == {"Cuisine", "Salon", "Chambre", "Bureau"}
    kitchen = next(e for e in entities if e.name == "Lumière de la cuisine")
    assert (kitchen.domain, kitchen.areas) == ("light", ("Cuisine",))
    assert system_with_home("Tu es Jarvis.", "") == "Tu es Jarvis."


def test_tool_results_and_failures_as_tool_messages() -> None:
    done = json.dumps({**DONE, "data": {"success": [{"name": "Chauffage"}], "failed": []}})
    ok = types.CallToolResult(content=[types.TextContent(type="text", text=done)])
    assert tool_result_content(ok) == done
    no_match = (
        "Error calling tool: <MatchFailedError result=MatchTargetsResult(is_match=False, "
        "no_match_reason=<MatchFailedReason.NAME: 1>, states=[]), constraints=...>"
    )
    failed = types.CallToolResult(content=[types.TextContent(type="text", text=no_match)], isError=True)
    assert json.loads(tool_result_content(failed, "fr")) == {
        "error": "HomeAssistantError",
        "error_text": "aucun appareil exposé à Assist ne correspond",
    }
    assert (
        json.loads(tool_result_content(failed, "en"))["error_text"] == "no device exposed to Assist matches"
    )
    assert (
        spoken_error("Error calling tool: Temperature 45 out of range.", "fr")
        == "Temperature 45 out of range"
    )
    assert spoken_error("Error calling tool: <ServiceNotFound object at 0x7f>", "en") == "ServiceNotFound"
    assert spoken_error("", "fr") == "l'action a échoué"
    assert len(spoken_error("x" * 500, "fr")) == 158


# --- why Home Assistant cannot be used ---------------------------------------------------------


def _status_error(status: int) -> httpx.HTTPStatusError:
    request = httpx.Request("GET", "http://hass:8123/mcp_server/sse")
    return httpx.HTTPStatusError("refused", request=request, response=httpx.Response(status, request=request))


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (ExceptionGroup("sse", [_status_error(401)]), "unauthorized"),
        (_status_error(403), "unauthorized"),
        (ExceptionGroup("outer", [ExceptionGroup("sse", [_status_error(404)])]), "not_configured"),
        (_status_error(500), "protocol"),
        (httpx.ConnectError("All connection attempts failed"), "unreachable"),
        (ConnectionRefusedError(111, "refused"), "unreachable"),
        (TimeoutError(), "timeout"),
        (RuntimeError("odd"), "protocol"),
    ],
)
def test_failures_are_classified(error: BaseException, reason: str) -> None:
    assert classify_failure(error).reason == reason


def test_the_user_hears_why_in_their_language() -> None:
    assert "jeton" in HomeUnavailable("unauthorized", "401").sentence("fr")
    assert "token" in HomeUnavailable("unauthorized", "401").sentence("en")
    assert "joindre Home Assistant" in HomeUnavailable("unreachable", "refused").sentence("fr")
    assert "reach Home Assistant" in HomeUnavailable("timeout", "slow").sentence("en-US")
    assert "Model Context Protocol Server" in HomeUnavailable("not_configured", "404").sentence("fr")


async def test_an_unreachable_home_assistant_is_a_clear_failure_quickly() -> None:
    home = McpHome("http://127.0.0.1:9", "token", timeout_s=3)
    with pytest.raises(HomeUnavailable) as caught:
        async with home.session():
            pass
    assert caught.value.reason == "unreachable"


# --- a transcript's rounds -----------------------------------------------------------------------


class RecordedHome(McpHome):
    """Home Assistant's side of the session, answering as the real one did (see module doc)."""

    def __init__(self, results: Mapping[str, str] | None = None) -> None:
        super().__init__("http://hass.invalid:8123", "token", 5)
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.results = dict(results or {})

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[Any]:
        yield object()

    async def snapshot(self, session: Any) -> HomeSnapshot:
        return HomeSnapshot(openai_tools(recorded_tools()), recorded_prompt())

    async def call(self, session: Any, name: str, arguments: Mapping[str, Any], language: str = "fr") -> str:
        self.calls.append((name, dict(arguments)))
        if name in self.results:
            return self.results[name]
        target = arguments.get("name") or arguments.get("area")
        return json.dumps({**DONE, "data": {"success": [{"name": target}], "failed": []}}, ensure_ascii=False)


class ScriptedModel(ChatEngine):
    """One scripted answer per request: a tool call (a dict) or text; fails when out of script."""

    def __init__(self, script: Sequence[dict[str, Any] | str]) -> None:
        self.name = self.model = "scripted"
        self.device = "cpu"
        self.quality = 1
        self.script = list(script)
        self.requests: list[ChatRequest] = []

    async def load(self) -> None:
        return None

    async def stream(self, request: ChatRequest) -> AsyncGenerator[ChatDelta, None]:
        self.requests.append(request)
        assert self.script, "the model was asked more than the script says"
        step = self.script.pop(0)
        if isinstance(step, dict):
            yield ChatDelta("", "tool_calls", [openai_tool_call(step["name"], step["arguments"])])
        else:
            yield ChatDelta(step, "stop")


def service(model: ChatEngine, **overrides: Any) -> HandleService:
    return HandleService(make_context(make_settings(**overrides)), engines=[model])


async def converse(control: HomeControl, key: str, text: str, language: str = "fr") -> tuple[str, list[str]]:
    history = await control.service.read_conversation(key)
    messages = control.with_calls(key, control.service.conversation_messages(key, text, language, history))
    chunks: list[str] = []

    async def on_chunk(piece: str) -> None:
        chunks.append(piece)

    done = await control.answer(messages, language, on_chunk)
    await control.service.remember(key, text, done.text, implicit=False)
    control.remember_calls(key, text, done.calls, implicit=False)
    return done.text, chunks


async def test_a_command_then_a_pronoun_through_the_templates_no_model() -> None:
    model = ScriptedModel(["Que voulez-vous que j'éteigne ?"])  # only for the third request
    home = RecordedHome()
    control = HomeControl(service(model), home)
    said, chunks = await converse(control, "c1", "Allume la lumière de la cuisine")
    assert home.calls == [("HassTurnOn", {"name": "Lumière de la cuisine"})]
    assert said == "J'ai allumé la lumière de la cuisine." and chunks == [said]
    said, _ = await converse(control, "c1", "Éteins-la")
    assert home.calls[-1] == ("HassTurnOff", {"name": "Lumière de la cuisine"})
    assert said == "J'ai éteint la lumière de la cuisine."
    assert not model.requests  # Home Assistant's templates answered both
    said, _ = await converse(control, "c2", "Éteins-la")  # another conversation: no target to reuse
    assert len(home.calls) == 2 and said == "Que voulez-vous que j'éteigne ?"
    assert model.requests[0].tools, "with Home Assistant's tools offered"


async def test_a_model_call_is_checked_run_and_its_result_worded() -> None:
    model = ScriptedModel(
        [{"name": "HassTurnOn", "arguments": {"name": "Lampe de chevet"}}, "La lampe de chevet est allumée."]
    )
    home = RecordedHome()
    control = HomeControl(service(model, **{"handle.local_intents": False}), home)
    said, chunks = await converse(control, "c3", "Il fait sombre près du lit")
    assert home.calls == [("HassTurnOn", {"name": "Lampe de chevet"})]
    assert said == "La lampe de chevet est allumée." and "".join(chunks) == said
    second = model.requests[1].messages
    assert (
        second[-2]["role"] == "assistant" and second[-2]["tool_calls"][0]["function"]["name"] == "HassTurnOn"
    )
    assert (
        second[-1]["role"] == "tool" and json.loads(second[-1]["content"])["response_type"] == "action_done"
    )
    assert "Static Context: An overview" in second[0]["content"]  # Home Assistant's prompt, after ours


async def test_a_call_naming_a_device_the_home_lacks_never_reaches_home_assistant() -> None:
    model = ScriptedModel([{"name": "HassTurnOn", "arguments": {"name": "Lumière du garage"}}])
    home = RecordedHome()
    control = HomeControl(service(model, **{"handle.local_intents": False}), home)
    with pytest.raises(AllLevelsFailed):
        await converse(control, "c4", "Allume le garage")
    assert home.calls == []


async def test_a_failed_tool_is_said_not_hidden() -> None:
    failure = json.dumps(
        {"error": "HomeAssistantError", "error_text": "aucun appareil exposé à Assist ne correspond"}
    )
    home = RecordedHome({"HassTurnOn": failure})
    control = HomeControl(service(ScriptedModel([])), home)
    said, _ = await converse(control, "c5", "Allume la lumière de la cuisine")
    assert said == "Je n'ai pas pu le faire : aucun appareil exposé à Assist ne correspond."
    metrics = control.service.context.metrics
    assert metrics.home_actions.labels("mcp", "tool_error")._value.get() == 1


async def test_rounds_stop_at_three() -> None:
    call = {"name": "HassTurnOn", "arguments": {"name": "Lumière du salon"}}
    model = ScriptedModel([call, call, call])
    home = RecordedHome()
    control = HomeControl(service(model, **{"handle.local_intents": False}), home)
    said, _ = await converse(control, "c6", "Allume le salon, encore et encore")
    assert len(model.requests) == 3 and len(home.calls) == 2
    assert said == "C'est fait."


def test_calls_are_kept_per_conversation_and_expire() -> None:
    control = HomeControl(service(ScriptedModel([]), **{"handle.memory_ttl_s": 60}), RecordedHome())
    calls: list[dict[str, Any]] = [
        {"role": "assistant", "content": "", "tool_calls": [{"id": "a"}]},
        {"role": "tool", "content": "{}"},
    ]
    control.remember_calls("k", "Allume", calls, implicit=False)
    messages = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "Allume"},
        {"role": "assistant", "content": "J'ai allumé."},
        {"role": "user", "content": "Éteins-la"},
    ]
    assert control.with_calls("k", messages) == [*messages[:2], *calls, *messages[2:]]
    assert control.with_calls("other", messages) == messages
    control._calls["k"] = (0.0, control._calls["k"][1])  # long past its lifetime
    assert control.with_calls("k", messages) == messages
    quiet = HomeControl(service(ScriptedModel([]), **{"handle.implicit_memory_ttl_s": 0}), RecordedHome())
    quiet.remember_calls("peer:10.0.0.2", "Allume", calls, implicit=True)  # implicit memory off: nothing kept
    assert quiet.with_calls("peer:10.0.0.2", messages) == messages


def test_home_control_needs_an_http_url_and_a_token() -> None:
    from wyoming_superwhisper.config import ConfigError

    assert service(ScriptedModel([])).home_control is None  # no URL: the handle only talks
    half = service(ScriptedModel([]), **{"handle.hass_url": "http://hass:8123"})
    assert half.home_control is None  # no token: off, with a warning
    full = service(ScriptedModel([]), **{"handle.hass_url": "http://hass:8123/", "handle.hass_token": "t"})
    assert full.home_control is not None
    assert full.home_control.home.sse_url == "http://hass:8123/mcp_server/sse"
    with pytest.raises(ConfigError, match=r"handle\.hass_url"):
        McpHome("hass:8123", "t", 5)
    with pytest.raises(ConfigError, match=r"handle\.hass_url"):  # the start stops, the key named
        service(ScriptedModel([]), **{"handle.hass_url": "hass:8123", "handle.hass_token": "t"})


# --- the Wyoming handler with home control (a real server on loopback) ------------------------


class BrokenHome(RecordedHome):
    """Home Assistant failing in one of the ways the handler must turn into a spoken sentence."""

    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.error = error

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[Any]:
        raise self.error
        yield  # pragma: no cover - a generator, for asynccontextmanager


async def transcript(port: int, text: str, language: str = "fr") -> list[Event]:
    events: list[Event] = []
    async with AsyncTcpClient(LOOPBACK, port) as client:
        await client.write_event(Transcript(text=text, language=language).event())
        while True:
            event = await asyncio.wait_for(client.read_event(), 30)
            assert event is not None, "server closed the connection"
            events.append(event)
            if event.type in ("handled-stop", "not-handled", "error"):
                return events


def with_home(home: McpHome) -> HandleService:
    served = service(
        ScriptedModel([]), **{"handle.hass_url": "http://hass.invalid:8123", "handle.hass_token": "t"}
    )
    served.home_control = HomeControl(served, home)  # Home Assistant's side, recorded
    return served


async def test_the_handler_streams_the_confirmation_and_advertises_home_control(serve: Any) -> None:
    home = RecordedHome()
    async with serve(with_home(home)) as server:
        events = await transcript(server.port, "Allume la lumière de la cuisine")
        async with AsyncTcpClient(LOOPBACK, server.port) as client:
            await client.write_event(Describe().event())
            info = await asyncio.wait_for(client.read_event(), 10)
    assert [e.type for e in events] == ["handled-start", "handled-chunk", "handled", "handled-stop"]
    assert events[2].data["text"] == "J'ai allumé la lumière de la cuisine." == events[1].data["text"]
    assert home.calls == [("HassTurnOn", {"name": "Lumière de la cuisine"})]
    assert info is not None and Info.from_event(info).handle[0].supports_home_control is True


@pytest.mark.parametrize(
    ("error", "said", "outcome"),
    [
        (
            HomeUnavailable("unreachable", "refused"),
            "Je n'arrive pas à joindre Home Assistant.",
            "unreachable",
        ),
        (HomeUnavailable("unauthorized", "401"), "Home Assistant a refusé mon accès", "unauthorized"),
        (RuntimeError("a bug on either side"), "Désolé", "protocol"),
    ],
)
async def test_home_assistant_unusable_is_said_and_the_server_keeps_serving(
    serve: Any, error: Exception, said: str, outcome: str
) -> None:
    served = with_home(BrokenHome(error))
    async with serve(served) as server:
        for _ in range(2):  # and again: nothing is stuck, no slot leaked
            events = await transcript(server.port, "Allume la lumière de la cuisine")
            assert [e.type for e in events] == ["not-handled"]
            assert events[0].data["text"].startswith(said), events[0].data
    assert served.context.metrics.home_actions.labels("mcp", outcome)._value.get() == 2
    assert served.in_flight.count == 0


class CountedHome(RecordedHome):
    """The recorded Home Assistant, counting the sessions opened to it."""

    def __init__(self) -> None:
        super().__init__()
        self.sessions = 0

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[Any]:
        self.sessions += 1
        yield object()


async def until_reached(served: HandleService) -> dict[str, Any]:
    for _ in range(500):  # bounded: the warm-up is a task of the start
        home = served.status()["home"]
        if home["reachable"] is not None:
            return dict(home)
        await asyncio.sleep(0.01)
    raise AssertionError("Home Assistant was never tried after the start")


async def test_home_assistant_is_reached_at_start_and_the_templates_compiled(serve: Any) -> None:
    """Before any command: one session to Home Assistant (the MCP client imported, its first
    session paid), French and English templates compiled; ``/status`` says Home Assistant answered."""
    home = CountedHome()
    served = with_home(home)
    assert served.status()["home"] == {"reachable": None}
    type(served.intents)._templates.cache_clear()
    async with serve(served) as server:
        assert await until_reached(served) == {"reachable": True, "tools": len(RECORDED["tools"])}
        assert home.sessions == 1
        assert type(served.intents)._templates.cache_info().currsize == 4  # fr, en: all, the clock's
        events = await transcript(server.port, "Allume la lumière de la cuisine")
    assert events[-1].type == "handled-stop"
    assert home.sessions == 2 and type(served.intents)._templates.cache_info().misses == 4


async def test_a_home_assistant_refusing_the_token_shows_in_status_from_the_start(serve: Any) -> None:
    served = with_home(BrokenHome(HomeUnavailable("unauthorized", "401 Unauthorized")))
    async with serve(served) as server:
        reached = await until_reached(served)
        assert (reached["reachable"], reached["reason"]) == (False, "unauthorized")
        assert "401" in reached["detail"]
        events = await transcript(server.port, "Allume la lumière de la cuisine")
        assert [e.type for e in events] == ["not-handled"]  # and the server keeps serving
        assert served.status()["home"]["reason"] == "unauthorized"


@pytest.mark.parametrize(
    ("home", "status", "detail"),
    [
        (RecordedHome(), Status.OK, f"MCP server answered: {len(RECORDED['tools'])} tools"),
        (BrokenHome(HomeUnavailable("unauthorized", "401 Unauthorized")), Status.BROKEN, "401"),
        (BrokenHome(HomeUnavailable("not_configured", "404 on /mcp_server/sse")), Status.BROKEN, "404"),
        (BrokenHome(HomeUnavailable("unreachable", "connection refused")), Status.DEGRADED, "refused"),
    ],
    ids=["reached", "token-refused", "no-mcp-server", "down"],
)
async def test_the_doctor_says_whether_the_handle_can_act_on_the_home(
    home: McpHome, status: Status, detail: str
) -> None:
    served = with_home(home)
    report = Report()
    await check_services(report, served.context, {"handle": lambda _: served}, load_all_levels=False)
    check = next(c for c in report.checks if c.name == "home assistant")
    assert (check.area, check.status) == ("handle", status) and detail in check.detail, check


async def test_the_homes_confirmations_are_offered_to_be_ready_at_start(serve: Any) -> None:
    """Each switchable exposed device, on and off (a cover opened and closed), worded as the
    confirmation after the call would be (10 devices of the recorded home, 20 sentences), and
    the 4 fixed answers."""
    served = with_home(RecordedHome())
    async with serve(served):
        await until_reached(served)
        offered = [await asyncio.wait_for(served.context.phrases.next(), 5) for _ in range(24)]
    assert {language for language, _ in offered} == {"fr"}
    texts = [text for _, text in offered]
    assert "J'ai allumé la lumière de la cuisine." in texts and "J'ai éteint la cafetière." in texts
    assert "J'ai ouvert le volet du salon." in texts and "J'ai fermé le volet du salon." in texts
    assert not any("Chauffage" in t or "Température" in t for t in texts)  # not switched on/off
    assert {"C'est fait.", "Je n'ai pas compris quel appareil. Pouvez-vous répéter ?"} <= set(texts)
    assert served.context.phrases.offer("fr", texts) == 0  # each offered once
