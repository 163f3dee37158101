"""Record what Home Assistant's Ollama integration really sends, into tests/data fixtures.

    .venv/bin/python -m tests.e2e.capture_hass_ollama [--keep DIR]

A real Home Assistant (.venv-hass, ``scripts/setup_hass.sh``) with the French home of
``hass.py``, its Ollama integration pointed at the recording stub (``ollama_stub.py``)
through the config and options flows. One typed command, "Allume la lumière de la
cuisine" (French, to the Ollama agent): the stub answers the first ``/api/chat`` with a
``HassTurnOn`` tool call, Home Assistant executes it and asks again with the tool
result; the stub answers a sentence. Written (pretty-printed JSON):

- ``tests/data/hass-2025.4.4-ollama-chat.json``: the first ``/api/chat`` request (headers
  and body), every call Home Assistant made to the stub in order (setup included),
  the stub's answer lines and the conversation result;
- ``tests/data/hass-2025.4.4-ollama-chat-after-tool.json``: the second ``/api/chat``
  request (it carries the assistant's ``tool_calls`` message and the ``tool`` result).

Fails (exit 1) unless the kitchen light is really on afterwards. Takes ~30 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from .hass import (
    REPO,
    HassError,
    HassWebSocket,
    add_ollama_agent,
    build_french_home,
    converse,
    get_state,
    home_assistant,
    onboard_owner,
)
from .ollama_stub import MODEL, ChatReply, OllamaStub, RecordedRequest, ollama_stub

_LOGGER = logging.getLogger("capture_hass_ollama")

HASS_VERSION = "2025.4.4"
DATA = REPO / "tests" / "data"
FIRST = DATA / f"hass-{HASS_VERSION}-ollama-chat.json"
AFTER_TOOL = DATA / f"hass-{HASS_VERSION}-ollama-chat-after-tool.json"

COMMAND = "Allume la lumière de la cuisine"
LIGHT = "light.lumiere_cuisine"
TOOL_CALL = ChatReply.tool_call("HassTurnOn", {"name": "Lumière de la cuisine"})
FINAL = ChatReply("J'ai allumé la lumière de la cuisine.")


def _request_json(stub: OllamaStub, request: RecordedRequest) -> dict[str, Any]:
    return {**request.as_json(), "stub_answered": stub.reply_to(request)}


async def capture(config_dir: Path) -> dict[str, Any]:
    """Run Home Assistant and the stub, converse once; the two fixtures' contents."""
    with ollama_stub() as stub, home_assistant(config_dir, home=True) as hass:
        started = time.monotonic()
        hass.wait_ready()
        ready = time.monotonic() - started
        async with aiohttp.ClientSession() as session:
            token = await onboard_owner(session, hass.url)
            async with HassWebSocket.connect(session, hass.url, token) as ws:
                await build_french_home(ws)
            agent = await add_ollama_agent(session, hass.url, token, stub.url, MODEL)
            setup = time.monotonic() - started
            _LOGGER.info(
                "Home Assistant ready in %.1f s, home + Ollama agent %s in %.1f s",
                ready,
                agent.entity_id,
                setup,
            )
            before = await get_state(session, hass.url, token, LIGHT)
            if before["state"] != "off":
                raise HassError(f"{LIGHT} is {before['state']} before the command")
            stub.script(TOOL_CALL, FINAL)
            async with HassWebSocket.connect(session, hass.url, token) as ws:
                result = await converse(ws, COMMAND, agent.entity_id, "fr")
            after = await get_state(session, hass.url, token, LIGHT)
        chats = stub.recorded("/api/chat")
        if len(chats) != 2:
            raise HassError(f"expected 2 /api/chat requests, got {len(chats)}: {stub.calls()}")
        if after["state"] != "on":
            raise HassError(f"{LIGHT} is {after['state']} after the tool call; result {result}")
        common = {
            "home_assistant": HASS_VERSION,
            "ollama_python": "0.4.7",
            "captured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": {"text": COMMAND, "language": "fr", "agent_id": agent.entity_id},
            "options": agent.options,
        }
        first = {
            **common,
            "description": (
                "The first /api/chat Home Assistant sends for the command (Ollama agent, Assist API"
                " control), with every call it made to the stub in order, setup included."
            ),
            "calls": stub.calls(),
            "request": _request_json(stub, chats[0]),
            "conversation_result": result,
            "light_state_after": after["state"],
        }
        second = {
            **common,
            "description": (
                "The second /api/chat: after the stub answered the first with a HassTurnOn tool call,"
                " Home Assistant executed it and sends the assistant tool_calls message and the tool result."
            ),
            "request": _request_json(stub, chats[1]),
            "conversation_result": result,
            "light_state_after": after["state"],
        }
        return {"first": first, "second": second, "ready_s": ready, "setup_s": setup}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--keep", type=Path, help="Home Assistant's config dir (kept); default: a temporary one"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    with tempfile.TemporaryDirectory(prefix="hass-capture-") as tmp:
        config_dir = args.keep or Path(tmp) / "hass-config"
        try:
            out = asyncio.run(capture(config_dir))
        except HassError as error:
            _LOGGER.error("%s", error)
            return 1
    DATA.mkdir(parents=True, exist_ok=True)
    for path, content in ((FIRST, out["first"]), (AFTER_TOOL, out["second"])):
        path.write_text(json.dumps(content, ensure_ascii=False, indent=2) + "\n")
        _LOGGER.info("wrote %s", path.relative_to(REPO))
    _LOGGER.info(
        "Home Assistant ready after %.1f s; home + Ollama set up after %.1f s", out["ready_s"], out["setup_s"]
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
