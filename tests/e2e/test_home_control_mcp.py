"""A Wyoming client talks to our handle server, which acts on a real Home Assistant over MCP.

A real Home Assistant Core 2025.4.4 with the French home of ``hass.py`` and
its Model Context Protocol Server integration set up through its config flow
(the Assist API), and the real ``superwhisper handle`` process started with
``handle.hass_url`` and a token (from ``SUPERWHISPER_HANDLE__HASS_TOKEN``, as a
deployment passes secrets). A real Wyoming client sends transcripts, as a
satellite or Home Assistant's Wyoming conversation agent does; what is
asserted is Home Assistant's state, read back through its REST API: the
kitchen light really goes on, then off again on "Éteins-la", and the heating's
target really becomes 21 °C. Then a server with a wrong token: the user hears
why, and the server keeps answering.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from wyoming.asr import Transcript
from wyoming.client import AsyncTcpClient
from wyoming.handle import Handled, HandledChunk, NotHandled
from wyoming.info import Describe, Info

from .hass import (
    LOOPBACK,
    REPO,
    REQUIRES_HASS,
    SUPERWHISPER_BIN,
    HassWebSocket,
    ManagedProcess,
    add_wyoming_entry,
    call_service,
    converse,
    free_port,
    get_state,
    home_assistant,
    mcp_home,
    metric_total,
    reset_home,
    speech_of,
    start_process,
    wait_entries_loaded,
    wait_http,
)

pytestmark = REQUIRES_HASS

KITCHEN = "light.lumiere_cuisine"
HEATING = "climate.chauffage"


@dataclass
class HandleServer:
    process: ManagedProcess
    port: int
    metrics: int

    def metrics_text(self) -> str:
        import urllib.request

        with urllib.request.urlopen(f"http://{LOOPBACK}:{self.metrics}/metrics", timeout=10) as reply:
            return str(reply.read().decode())


@dataclass
class Setup:
    hass_url: str
    token: str
    handle: HandleServer
    log_dir: Path


def start_handle(log_dir: Path, name: str, hass_url: str, token_args: list[str]) -> HandleServer:
    port, metrics = free_port(), free_port()
    argv = [
        str(SUPERWHISPER_BIN), "handle", "--no-zeroconf", "--metrics-port", str(metrics),
        "--set", f"metrics.host={LOOPBACK}", "--set", f"handle.uri=tcp://{LOOPBACK}:{port}",
        "--set", f"handle.hass_url={hass_url}", *token_args,
    ]  # fmt: skip
    process = start_process(name, argv, log_dir / f"{name}.log", cwd=REPO)
    return HandleServer(process, port, metrics)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    root = tmp_path_factory.mktemp("hass-mcp")
    with home_assistant(root / "hass-config", home=True) as hass:
        hass.wait_ready()
        token = asyncio.run(mcp_home(hass.url, aliases={KITCHEN: ["Kitchen light"]}))
        with pytest.MonkeyPatch.context() as patch:
            # The secret through the environment, as the config system documents it.
            patch.setenv("SUPERWHISPER_HANDLE__HASS_TOKEN", token)
            handle = start_handle(root, "handle-mcp", hass.url, [])
        try:
            wait_http(f"http://{LOOPBACK}:{handle.metrics}/readyz", handle.process, 180)
            yield Setup(hass.url, token, handle, root)
        finally:
            handle.process.stop()


@dataclass
class Reply:
    kind: str
    """``handled`` or ``not-handled``."""
    text: str
    chunks: str


async def tell(port: int, text: str, language: str, conversation_id: str | None = None) -> Reply:
    """One transcript, as a Wyoming client sends it; the final answer and the streamed chunks."""
    context: dict[str, Any] | None = {"conversation_id": conversation_id} if conversation_id else None
    chunks: list[str] = []
    async with AsyncTcpClient(LOOPBACK, port) as client:
        await client.write_event(Transcript(text=text, language=language, context=context).event())
        while True:
            event = await asyncio.wait_for(client.read_event(), timeout=120)
            assert event is not None, f"connection closed without an answer to {text!r}"
            if HandledChunk.is_type(event.type):
                chunks.append(HandledChunk.from_event(event).text)
            elif Handled.is_type(event.type):
                return Reply("handled", Handled.from_event(event).text or "", "".join(chunks))
            elif NotHandled.is_type(event.type):
                return Reply("not-handled", NotHandled.from_event(event).text or "", "".join(chunks))


async def state_becomes(
    base: str, token: str, entity_id: str, check: Any, limit_s: float = 10.0
) -> dict[str, Any]:
    """The entity's state once ``check(state)`` holds; fails with the last state seen."""
    deadline = time.monotonic() + limit_s
    async with aiohttp.ClientSession() as session:
        while True:
            state = await get_state(session, base, token, entity_id)
            if check(state):
                return state
            if time.monotonic() > deadline:
                raise AssertionError(f"{entity_id} never reached the expected state: {state}")
            await asyncio.sleep(0.2)


async def test_a_wyoming_client_turns_the_kitchen_light_on_then_off_and_sets_the_heating(
    setup: Setup,
) -> None:
    base, token, port = setup.hass_url, setup.token, setup.handle.port
    async with aiohttp.ClientSession() as session:
        await reset_home(session, base, token)
        assert (await get_state(session, base, token, KITCHEN))["state"] == "off"
        assert (await get_state(session, base, token, HEATING))["attributes"]["temperature"] == 19.0

    on = await tell(port, "Allume la lumière de la cuisine", "fr", "mcp-e2e-cuisine")
    assert on.kind == "handled", on
    await state_becomes(base, token, KITCHEN, lambda s: s["state"] == "on")
    assert "allumé" in on.text.lower() and "cuisine" in on.text.lower(), on
    assert on.chunks == on.text  # what was streamed is what was said

    off = await tell(port, "Éteins-la", "fr", "mcp-e2e-cuisine")
    assert off.kind == "handled", off
    await state_becomes(base, token, KITCHEN, lambda s: s["state"] == "off")
    assert "éteint" in off.text.lower(), off

    heat = await tell(port, "Mets le chauffage à 21 degrés", "fr", "mcp-e2e-chauffage")
    assert heat.kind == "handled", heat
    await state_becomes(base, token, HEATING, lambda s: s["attributes"].get("temperature") == 21.0)
    assert "21" in heat.text, heat

    metrics = setup.handle.metrics_text()
    assert metric_total(metrics, "superwhisper_handle_home_actions_total", path="mcp", outcome="ok") >= 3
    assert metric_total(metrics, "superwhisper_requests_total", service="handle", outcome="error") == 0


async def test_the_same_in_english(setup: Setup) -> None:
    base, token = setup.hass_url, setup.token
    async with aiohttp.ClientSession() as session:
        await reset_home(session, base, token)
    reply = await tell(setup.handle.port, "Turn on the kitchen light", "en", "mcp-e2e-english")
    assert reply.kind == "handled", reply
    await state_becomes(base, token, KITCHEN, lambda s: s["state"] == "on")
    assert reply.text.lower().startswith("turned on"), reply


async def test_a_state_question_is_answered_from_home_assistants_live_context(setup: Setup) -> None:
    base, token = setup.hass_url, setup.token
    async with aiohttp.ClientSession() as session:
        await reset_home(session, base, token)
        await call_service(session, base, token, "light", "turn_on", {"entity_id": "light.lumiere_salon"})
    lit = await tell(setup.handle.port, "La lumière du salon est-elle allumée ?", "fr")
    assert lit.kind == "handled" and lit.text.startswith("Oui"), lit
    dark = await tell(setup.handle.port, "La lumière de la cuisine est-elle allumée ?", "fr")
    assert dark.kind == "handled" and dark.text.startswith("Non"), dark
    async with aiohttp.ClientSession() as session:  # asking changed nothing
        assert (await get_state(session, base, token, "light.lumiere_salon"))["state"] == "on"
        assert (await get_state(session, base, token, KITCHEN))["state"] == "off"


async def test_a_question_is_answered_and_changes_nothing(setup: Setup) -> None:
    """Not a command: the model answers with Home Assistant's tools at hand, the home stays as it is."""
    base, token = setup.hass_url, setup.token
    async with aiohttp.ClientSession() as session:
        await reset_home(session, base, token)
    reply = await tell(setup.handle.port, "Quelle est la capitale de la France ?", "fr")
    assert reply.kind == "handled" and reply.text.strip(), reply  # a question still gets an answer
    async with aiohttp.ClientSession() as session:
        assert (await get_state(session, base, token, KITCHEN))["state"] == "off"


async def test_a_client_that_hangs_up_mid_answer_leaves_nothing_stuck(setup: Setup) -> None:
    """The session with Home Assistant is closed with the answer; the next command is served."""
    client = AsyncTcpClient(LOOPBACK, setup.handle.port)
    await client.connect()
    await client.write_event(Transcript(text="Raconte-moi une longue histoire.", language="fr").event())
    await asyncio.sleep(1.0)  # the model is generating, the MCP session is open
    await client.disconnect()
    async with aiohttp.ClientSession() as session:
        await reset_home(session, setup.hass_url, setup.token)
    reply = await tell(setup.handle.port, "Allume la lumière de la cuisine", "fr")
    assert reply.kind == "handled", reply
    await state_becomes(setup.hass_url, setup.token, KITCHEN, lambda s: s["state"] == "on")
    metrics = setup.handle.metrics_text()
    assert metric_total(metrics, "superwhisper_queue_depth", service="handle") == 0


async def test_home_assistants_own_wyoming_agent_controls_the_home_through_us(setup: Setup) -> None:
    """Home Assistant 2025.4.4 adds our handle server as its Wyoming conversation agent; a
    sentence typed in its Assist dialog goes to us, we act through its MCP server."""
    base, token = setup.hass_url, setup.token
    async with aiohttp.ClientSession() as session:
        await reset_home(session, base, token)
        entry = await add_wyoming_entry(session, base, token, LOOPBACK, setup.handle.port)
        await wait_entries_loaded(session, base, token, [entry["entry_id"]])
        async with HassWebSocket.connect(session, base, token) as ws:
            registry = await ws.call("config/entity_registry/list")
            (agent,) = [
                e["entity_id"]
                for e in registry
                if e.get("config_entry_id") == entry["entry_id"]
                and e["entity_id"].startswith("conversation.")
            ]
            result = await converse(ws, "Allume la lumière de la cuisine", agent, limit_s=60)
            assert result["response"]["response_type"] == "action_done", result
            assert "allumé" in speech_of(result).lower(), result
            await state_becomes(base, token, KITCHEN, lambda s: s["state"] == "on")
            # Home Assistant 2025.4 sends the conversation id: the pronoun finds the light.
            follow = await converse(ws, "Éteins-la", agent, conversation_id=result["conversation_id"])
            assert "éteint" in speech_of(follow).lower(), follow
            await state_becomes(base, token, KITCHEN, lambda s: s["state"] == "off")


async def home_status(metrics_port: int) -> dict[str, Any]:
    """What ``/status`` says of Home Assistant once the start's warm-up has tried it."""
    async with aiohttp.ClientSession() as session:
        for _ in range(100):  # bounded: the warm-up runs right after the start
            async with session.get(f"http://{LOOPBACK}:{metrics_port}/status") as reply:
                document = await reply.json()
            home = next(s for s in document["services"] if s["service"] == "handle")["home"]
            if home["reachable"] is not None:
                return dict(home)
            await asyncio.sleep(0.1)
    raise AssertionError("Home Assistant never tried after the start")


async def test_the_token_is_redacted_in_status(setup: Setup) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://{LOOPBACK}:{setup.handle.metrics}/status") as reply,
    ):
        body = await reply.text()
    assert setup.token not in body
    assert '"hass_token": "***"' in body
    home = await home_status(setup.handle.metrics)  # reached at start: its 12 entities' tools
    assert home["reachable"] is True and home["tools"] >= 5, home


async def test_a_bad_token_is_said_and_the_server_keeps_serving(setup: Setup) -> None:
    handle = start_handle(
        setup.log_dir, "handle-bad-token", setup.hass_url, ["--set", "handle.hass_token=not-a-valid-token"]
    )
    try:
        wait_http(f"http://{LOOPBACK}:{handle.metrics}/readyz", handle.process, 180)
        home = await home_status(handle.metrics)  # known at start, before any command
        assert (home["reachable"], home["reason"]) == (False, "unauthorized"), home
        for text in ("Allume la lumière de la cuisine", "Bonjour"):
            reply = await tell(handle.port, text, "fr")
            assert reply.kind == "not-handled", reply
            assert "jeton" in reply.text and "Home Assistant" in reply.text, reply
        english = await tell(handle.port, "Turn on the kitchen light", "en")
        assert english.kind == "not-handled" and "token" in english.text, english
        async with AsyncTcpClient(LOOPBACK, handle.port) as client:  # still serving
            await client.write_event(Describe().event())
            event = await asyncio.wait_for(client.read_event(), timeout=10)
            assert event is not None and Info.is_type(event.type)
            assert Info.from_event(event).handle[0].supports_home_control
        assert handle.process.alive()
        metrics = handle.metrics_text()
        assert metric_total(metrics, "superwhisper_handle_home_actions_total", outcome="unauthorized") == 3
    finally:
        handle.process.stop()


def test_the_doctor_checks_the_token_against_the_real_home_assistant(setup: Setup) -> None:
    """``superwhisper doctor --only handle``: the good token reaches the MCP server, a bad one
    is broken (exit 2) with the reason, before any command."""
    import json
    import subprocess

    def doctor(token: str) -> tuple[int, dict[str, Any]]:
        argv = [
            str(SUPERWHISPER_BIN), "doctor", "--only", "handle", "--json",
            "--set", f"handle.hass_url={setup.hass_url}", "--set", f"handle.hass_token={token}",
        ]  # fmt: skip
        done = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=REPO)
        report = json.loads(done.stdout)
        return done.returncode, next(c for c in report["checks"] if c["name"] == "home assistant")

    code, check = doctor(setup.token)
    assert check["status"] == "ok" and "tools" in check["detail"], check
    assert code in (0, 1)  # degraded at worst: a missing preferred model, not the home
    code, check = doctor("not-a-valid-token")
    assert (code, check["status"]) == (2, "broken"), check
    assert "unauthorized" in check["detail"], check
