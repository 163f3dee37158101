"""The Ollama API on the handle service, spoken to by the ``ollama`` client Home Assistant uses.

Real SmolLM2-135M on CPU, real HTTP. The request with tools is the one Home
Assistant 2025.4.4 really sent (tests/data): whatever the tiny model chooses,
the grammar makes it either a sentence or a call that Home Assistant can
execute (an offered tool, an exposed name) — never a malformed call.
"""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import ollama
import pytest
import pytest_asyncio
from prometheus_client import generate_latest

from wyoming_superwhisper.handle.home import home_of
from wyoming_superwhisper.handle.intents import state_unknown
from wyoming_superwhisper.handle.ollama import chat_messages
from wyoming_superwhisper.handle.service import HandleService
from wyoming_superwhisper.handle.toolcalls import validate_call

from ..conftest import LOOPBACK, make_context, make_settings, serving

pytestmark = pytest.mark.asyncio(loop_scope="module")

DATA = Path(__file__).resolve().parents[1] / "data"
RUNNING: dict[str, HandleService] = {}
"""The module's server, for its metrics registry."""
HASS_REQUEST = json.loads((DATA / "hass-2025.4.4-ollama-chat.json").read_text())["request"]["body"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def base_url() -> AsyncIterator[str]:
    port = free_port()
    settings = make_settings(
        **{
            "handle.chain": [{"model": "smollm2-135m", "device": "cpu"}],
            "handle.max_tokens": 48,
            "handle.api_host": LOOPBACK,
            "handle.api_port": port,
        }
    )
    service = HandleService(make_context(settings))
    RUNNING["handle"] = service
    async with serving(service):
        yield f"http://{LOOPBACK}:{port}"


@pytest_asyncio.fixture(loop_scope="module")
async def client(base_url: str) -> AsyncIterator[ollama.AsyncClient]:
    """The client Home Assistant's Ollama integration holds (its sockets closed after each test)."""
    async with ollama.AsyncClient(host=base_url) as session:
        yield session


async def test_the_ollama_client_lists_and_shows_our_models(client: ollama.AsyncClient) -> None:
    listed = await client.list()
    names = [m.model for m in listed.models]
    assert "superwhisper:latest" in names and "smollm2-135m:latest" in names
    shown = await client.show("superwhisper")
    assert "tools" in (shown.capabilities or [])
    with pytest.raises(ollama.ResponseError) as raised:
        await client.show("llama3.2:latest")
    assert raised.value.status_code == 404


async def test_chat_streams_text_then_done(client: ollama.AsyncClient) -> None:
    parts = []
    final = None
    stream = await client.chat(
        model="superwhisper:latest",
        messages=[{"role": "user", "content": "Dis bonjour."}],
        stream=True,
        keep_alive="-1.0s",
        options={"num_ctx": 8192.0, "temperature": 0.0},
    )
    async for part in stream:
        if part.done:
            final = part
        else:
            parts.append(part.message.content or "")
    assert "".join(parts).strip(), "no text streamed"
    assert final is not None and final.done_reason in ("stop", "length")
    plain = await client.chat(model="smollm2-135m", messages=[{"role": "user", "content": "Dis bonjour."}])
    assert plain.done and (plain.message.content or "").strip()


async def _chat(client: ollama.AsyncClient, messages: list[dict[str, Any]]) -> tuple[str, list[Any]]:
    stream = await client.chat(
        model="superwhisper:latest", messages=messages, tools=HASS_REQUEST["tools"], stream=True,
        options={"temperature": 0.0},
    )  # fmt: skip
    said, calls = "", []
    async for part in stream:
        said += part.message.content or ""
        calls += part.message.tool_calls or []
    return said, calls


async def test_home_assistants_request_gets_text_or_an_executable_call(client: ollama.AsyncClient) -> None:
    home = home_of(chat_messages(HASS_REQUEST["messages"]), HASS_REQUEST["tools"])
    for text in ("Allume la lumière de la cuisine", "Éteins la lumière du salon", "Quelle heure est-il ?"):
        messages = [*HASS_REQUEST["messages"][:-1], {"role": "user", "content": text}]
        said, calls = await _chat(client, messages)
        assert said.strip() or calls, f"{text!r}: neither text nor a call"
        for call in calls:
            problem = validate_call(call.function.name, dict(call.function.arguments), home)
            assert problem is None, f"{text!r}: {problem}"


async def test_bad_requests_get_ollama_errors_and_the_server_keeps_serving(base_url: str) -> None:
    async with aiohttp.ClientSession() as session:
        cases: list[tuple[Any, int, str]] = [
            ({"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, "not found"),
            ({"model": "superwhisper", "messages": "x"}, 400, "messages"),
            (
                {"model": "superwhisper", "messages": [{"role": "user", "content": "x"}], "tools": "x"},
                400,
                "tools",
            ),
            (
                {"model": "superwhisper", "stream": False, "messages": [{"role": "user", "content": "x"}],
                 "tools": [{"function": {"name": "bad name!"}}]},
                400,
                "function.name",
            ),
            ({"model": "superwhisper", "keep_alive": "forever", "messages": []}, 400, "duration"),
        ]  # fmt: skip
        for body, status, fragment in cases:
            async with session.post(f"{base_url}/api/chat", json=body) as response:
                assert response.status == status, body
                assert fragment in (await response.json())["error"]
        async with session.post(f"{base_url}/api/chat", data=b"{not json") as response:
            assert response.status == 400
        # an empty request preloads, as Ollama answers it (keep_alive 0: "unload")
        for path, body, reason in (
            ("chat", {"model": "superwhisper", "messages": []}, "load"),
            ("generate", {"model": "superwhisper", "prompt": "", "keep_alive": 0}, "unload"),
        ):
            async with session.post(f"{base_url}/api/{path}", json=body) as response:
                assert response.status == 200
                reply = await response.json()
                assert reply["done"] and reply["done_reason"] == reason, reply
        # a client that drops mid-stream gives its slot back
        for _ in range(6):
            async with session.post(
                f"{base_url}/api/chat",
                json={
                    "model": "superwhisper",
                    "messages": [{"role": "user", "content": "Raconte une histoire."}],
                },
            ) as response:
                await response.content.readline()
        async with session.post(
            f"{base_url}/api/generate", json={"model": "superwhisper", "prompt": "Bonjour", "stream": False}
        ) as response:
            assert response.status == 200, await response.text()
            body = await response.json()
            assert body["done"] and body["response"].strip()


async def test_a_home_command_is_home_assistants_call_and_its_result_is_worded(
    client: ollama.AsyncClient, base_url: str
) -> None:
    """Home Assistant's templates answer before the 135M model: the right call, once, then the words."""
    system = HASS_REQUEST["messages"][:-1]
    asked = [*system, {"role": "user", "content": "Allume la lumière de la cuisine"}]
    said, calls = await _chat(client, asked)
    assert [(c.function.name, dict(c.function.arguments)) for c in calls] == [
        ("HassTurnOn", {"name": "Lumière de la cuisine"})
    ], "exactly one call (Home Assistant runs every call of every streamed line)"
    done = {"speech": {}, "response_type": "action_done",
            "data": {"targets": [], "success": [{"name": "Lumière de la cuisine", "type": "entity",
                                                 "id": "light.lumiere_cuisine"}], "failed": []}}  # fmt: skip
    call = {"function": {"name": "HassTurnOn", "arguments": {"name": "Lumière de la cuisine"}}}
    history = [
        *asked,
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": json.dumps(done)},
    ]
    said, calls = await _chat(client, history)
    assert said == "J'ai allumé la lumière de la cuisine." and not calls
    history.append({"role": "assistant", "content": said})
    said, calls = await _chat(client, [*history, {"role": "user", "content": "Éteins-la"}])
    assert [(c.function.name, dict(c.function.arguments)) for c in calls] == [
        ("HassTurnOff", {"name": "Lumière de la cuisine"})
    ]
    plain = await client.chat(
        model="superwhisper:latest", messages=asked, tools=HASS_REQUEST["tools"], stream=False
    )
    assert [c.function.name for c in plain.message.tool_calls or []] == ["HassTurnOn"]
    metrics_text = generate_latest(RUNNING["handle"].context.metrics.registry).decode()
    assert 'superwhisper_handle_local_intents_total{reason="intent"}' in metrics_text
    assert 'superwhisper_handle_local_intents_total{reason="follow_up"} 1.0' in metrics_text


async def test_a_command_nothing_matched_is_not_guessed_when_no_level_may_act(
    client: ollama.AsyncClient,
) -> None:
    """SmolLM2 (catalog ``tools: false``) is the only level: no device is switched at random."""
    system = HASS_REQUEST["messages"][:-1]
    for text, expected in (
        ("Allume la lumière du garage", "Je n'ai pas compris quel appareil. Pouvez-vous répéter ?"),
        ("Étant la l'alombe de chevais.", "Je n'ai pas compris quel appareil. Pouvez-vous répéter ?"),
        ("Turn on the garage light", "I did not understand which device. Could you say it again?"),
        ("Éton la cafetière", "Je n'ai pas compris ce que je dois faire. Pouvez-vous répéter ?"),
    ):
        said, calls = await _chat(client, [*system, {"role": "user", "content": text}])
        assert (said, calls) == (expected, []), text
    said, calls = await _chat(
        client, [*system, {"role": "user", "content": "Quelle est la capitale de l'Italie ?"}]
    )
    assert not calls and said.strip() and "appareil" not in said, "a question is the model's to answer"
    # A state question the templates missed: the words-only model would make the state up
    # (SmolLM2 once answered "The living room is on." to a misheard "Is the living room life on?").
    for text, expected in (
        ("Est-ce que la lumière du garage est allumée ?", state_unknown("fr")),
        ("Le salon est-il bien chauffé en ce moment ?", state_unknown("fr")),
        ("Is the salon life on?", state_unknown("en")),
    ):
        said, calls = await _chat(client, [*system, {"role": "user", "content": text}])
        assert (said, calls) == (expected, []), text
    metrics_text = generate_latest(RUNNING["handle"].context.metrics.registry).decode()
    assert 'superwhisper_handle_local_intents_total{reason="not_understood"} 4.0' in metrics_text
    assert 'superwhisper_handle_local_intents_total{reason="state_unknown"} 3.0' in metrics_text
