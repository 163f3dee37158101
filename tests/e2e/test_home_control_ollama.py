"""Home Assistant's Ollama integration against our real handle server: set up, asked, answered.

A real Home Assistant Core 2025.4.4 with the French home of ``hass.py``, its
Ollama integration set up through the config and options flows (Assist API on)
against ``superwhisper handle`` with the embedded SmolLM2-135M. What this proves:
Home Assistant lists our models, sends its tools, and every command comes back
as an answer, never an error, whatever the model chose; a call the model made
is one Home Assistant executes. Whether the *right* light turns on is the
model's accuracy, measured by ``bench/home_control_bench.py``, not asserted here
(the embedded model gets about one command in ten right).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from .hass import (
    LOOPBACK,
    REPO,
    REQUIRES_HASS,
    SUPERWHISPER_BIN,
    HassWebSocket,
    ManagedProcess,
    add_ollama_agent,
    build_french_home,
    converse,
    free_port,
    home_assistant,
    metric_total,
    onboard_owner,
    speech_of,
    start_process,
    wait_http,
)

pytestmark = REQUIRES_HASS


def handle_server(log_dir: Path) -> tuple[ManagedProcess, int, int]:
    api, metrics = free_port(), free_port()
    argv = [
        str(SUPERWHISPER_BIN), "handle", "--no-zeroconf", "--metrics-port", str(metrics),
        "--set", f"metrics.host={LOOPBACK}", "--set", f"handle.uri=tcp://{LOOPBACK}:{free_port()}",
        "--set", f"handle.api_host={LOOPBACK}", "--set", f"handle.api_port={api}",
    ]  # fmt: skip
    return start_process("superwhisper handle", argv, log_dir / "handle.log", cwd=REPO), api, metrics


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int, int]]:
    root = tmp_path_factory.mktemp("hass-ollama")
    process, api, metrics = handle_server(root)
    try:
        with home_assistant(root / "hass-config", home=True) as hass:
            hass.wait_ready()
            wait_http(f"http://{LOOPBACK}:{metrics}/readyz", process, 180)
            yield hass.url, api, metrics
    finally:
        process.stop()


async def test_home_assistants_ollama_agent_is_answered_by_our_server(servers: tuple[str, int, int]) -> None:
    base, api, metrics = servers
    async with aiohttp.ClientSession() as session:
        token = await onboard_owner(session, base)
        async with HassWebSocket.connect(session, base, token) as ws:
            await build_french_home(ws)
        agent = await add_ollama_agent(
            session, base, token, f"http://{LOOPBACK}:{api}", "superwhisper:latest"
        )
        async with HassWebSocket.connect(session, base, token) as ws:
            for text, language in (
                ("Allume la lumière de la cuisine", "fr"),
                ("Mets le chauffage à 21 degrés", "fr"),
                ("Turn on the kitchen light", "en"),
            ):
                started = time.monotonic()
                result = await converse(ws, text, agent.entity_id, language=language, limit_s=120)
                response = result["response"]
                assert response["response_type"] != "error", (text, response)
                assert speech_of(result).strip() or response.get("data"), (text, result)
                assert time.monotonic() - started < 120
        async with session.get(f"http://{LOOPBACK}:{metrics}/metrics") as reply:
            exposition = await reply.text()
    # each command is at least one /api/chat (two when Home Assistant ran a call), none failed
    assert metric_total(exposition, "superwhisper_requests_total", service="handle", outcome="ok") >= 3
    assert metric_total(exposition, "superwhisper_requests_total", service="handle", outcome="error") == 0
