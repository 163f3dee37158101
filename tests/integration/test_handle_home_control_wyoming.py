"""Wyoming 1.9 home control at the protocol level, against the real ``superwhisper handle``.

From Wyoming 1.9 (Home Assistant 2026.6+), a handle server may answer a
transcript with ``intents-start`` / ``intent`` / ``intents-stop``, which Home
Assistant executes, and says so with ``supports_home_control``. The Home
Assistant that runs here (2025.4.4) is older, so the client here is the
``wyoming`` library itself (1.10: the headers it writes say so) for a new
client, and raw JSON lines with ``"version": "1.5.4"`` (Home Assistant
2025.4's release) for an old one. The server is the real process with the
embedded model, started with ``handle.wyoming_intents: true``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from wyoming import __version__ as wyoming_version
from wyoming.asr import Transcript
from wyoming.client import AsyncTcpClient
from wyoming.event import Event, async_read_event
from wyoming.info import Describe, Info
from wyoming.intent import Intent

from tests.e2e.hass import (
    LOOPBACK,
    REPO,
    SUPERWHISPER_BIN,
    ManagedProcess,
    free_port,
    start_process,
    wait_http,
)
from wyoming_superwhisper.handle.handler import protocol_version

OLD_CLIENT = "1.5.4"
"""The ``wyoming`` release of Home Assistant 2025.4 (its manifest pins it)."""
ANSWER_ENDS = ("handled-stop", "not-handled", "intents-stop", "error")


@pytest.fixture(scope="module")
def handle_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, int]]:
    root: Path = tmp_path_factory.mktemp("handle-intents")
    port, metrics = free_port(), free_port()
    argv = [
        str(SUPERWHISPER_BIN), "handle", "--no-zeroconf", "--metrics-port", str(metrics),
        "--set", f"metrics.host={LOOPBACK}", "--set", f"handle.uri=tcp://{LOOPBACK}:{port}",
        "--set", "handle.wyoming_intents=true",
    ]  # fmt: skip
    process: ManagedProcess = start_process("superwhisper handle", argv, root / "handle.log", cwd=REPO)
    try:
        wait_http(f"http://{LOOPBACK}:{metrics}/readyz", process, 180)
        yield port, metrics
    finally:
        process.stop()


async def new_client(port: int, event: Event) -> list[Event]:
    """Send one event with the ``wyoming`` library (headers say 1.10+); read the whole answer."""
    assert protocol_version(wyoming_version) >= (1, 9)
    events: list[Event] = []
    async with AsyncTcpClient(LOOPBACK, port) as client:
        await client.write_event(event)
        while True:
            read = await asyncio.wait_for(client.read_event(), timeout=120)
            assert read is not None, f"closed after {[e.type for e in events]}"
            events.append(read)
            if read.type in ANSWER_ENDS or Info.is_type(read.type):
                return events


async def old_client(port: int, event_type: str, data: dict[str, Any]) -> list[Event]:
    """The same, written as Home Assistant 2025.4's ``wyoming`` 1.5.4 writes it."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    try:
        body = json.dumps(data, ensure_ascii=False).encode()
        header = {"type": event_type, "version": OLD_CLIENT, "data_length": len(body)}
        writer.write(json.dumps(header).encode() + b"\n" + body)
        await writer.drain()
        events: list[Event] = []
        while True:
            read = await asyncio.wait_for(async_read_event(reader), timeout=120)
            assert read is not None, f"closed after {[e.type for e in events]}"
            events.append(read)
            if read.type in ANSWER_ENDS or Info.is_type(read.type):
                return events
    finally:
        writer.close()


def test_versions_from_headers() -> None:
    assert protocol_version("1.10.2") == (1, 10, 2)
    assert protocol_version("1.9.0") >= (1, 9) > protocol_version("1.8.9") >= protocol_version("1.5.4")
    assert protocol_version("2.0.0rc1") == (2, 0, 0)
    assert protocol_version(None) == protocol_version("") == protocol_version("dev") == ()


async def test_describe_advertises_home_control_to_new_clients_only(handle_port: tuple[int, int]) -> None:
    port, _ = handle_port
    (info,) = await new_client(port, Describe().event())
    assert Info.from_event(info).handle[0].supports_home_control is True
    (old,) = await old_client(port, "describe", {})
    assert old.type == "info" and old.data["handle"][0].get("supports_home_control") is False
    assert old.data["handle"][0]["models"], "the rest of the info is unchanged"


async def test_a_new_client_gets_the_intents_home_assistant_executes(handle_port: tuple[int, int]) -> None:
    port, _ = handle_port
    context = {"conversation_id": "wyoming-19"}
    events = await new_client(
        port, Transcript(text="Allume la lumière de la cuisine", language="fr", context=context).event()
    )
    assert [e.type for e in events] == ["intents-start", "intent", "intents-stop"]
    intent = Intent.from_event(events[1])
    assert intent.name == "HassTurnOn"
    assert {e.name: e.value for e in intent.entities} == {"area": "cuisine", "domain": "light"}
    assert intent.text == "Allumé"  # Home Assistant's own French response to HassTurnOn
    assert events[0].data["context"]["conversation_id"] == "wyoming-19"

    heating = await new_client(port, Transcript(text="Mets le chauffage à 21 degrés", language="fr").event())
    intent = Intent.from_event(heating[1])
    assert intent.name == "HassClimateSetTemperature"
    assert {e.name: e.value for e in intent.entities}["temperature"] == 21
    assert intent.text is not None and "{{ slots.temperature }}" in intent.text

    english = await new_client(port, Transcript(text="Turn off the kitchen light", language="en").event())
    assert [e.type for e in english] == ["intents-start", "intent", "intents-stop"]
    assert Intent.from_event(english[1]).name == "HassTurnOff"


async def test_a_question_is_still_answered_in_words(handle_port: tuple[int, int]) -> None:
    port, _ = handle_port
    events = await new_client(
        port, Transcript(text="Raconte-moi une courte histoire.", language="fr").event()
    )
    types = [e.type for e in events]
    assert "intent" not in types and types[-1] == "handled-stop", types
    (handled,) = [e for e in events if e.type == "handled"]
    assert handled.data["text"].strip()


async def test_an_old_client_gets_words_as_today(handle_port: tuple[int, int]) -> None:
    port, _ = handle_port
    events = await old_client(
        port, "transcript", {"text": "Allume la lumière de la cuisine", "language": "fr"}
    )
    types = [e.type for e in events]
    assert "intent" not in types and "intents-start" not in types, types
    assert types[0] == "handled-start" and types[-1] == "handled-stop", types
    (handled,) = [e for e in events if e.type == "handled"]
    assert handled.data["text"].strip()
