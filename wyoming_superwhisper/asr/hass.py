"""Names from Home Assistant (entities, areas, floors) as recognition hints.

Whisper does not know that "Kerguelen" is the name of a lamp in this house.
With ``asr.hass_url`` and a token, the service fetches the friendly names of
the controllable entities and the names of areas and floors through Home
Assistant's REST API, keeps them in memory, and refreshes them in the
background; a transcription never waits for Home Assistant, and a failed
refresh keeps the last good list.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

_LOGGER = logging.getLogger(__name__)

CONTROLLABLE_DOMAINS = (
    "light",
    "switch",
    "cover",
    "climate",
    "fan",
    "media_player",
    "lock",
    "scene",
    "script",
    "vacuum",
    "valve",
    "humidifier",
    "water_heater",
)

AREAS_TEMPLATE = (
    "{{ ((areas() | map('area_name') | list) + (floors() | map('floor_name') | list)) | tojson }}"
)


def names_from_states(states: Any) -> list[str]:
    """Friendly names of controllable entities from ``GET /api/states``."""
    names: list[str] = []
    if not isinstance(states, list):
        return names
    for state in states:
        if not isinstance(state, dict):
            continue
        entity_id = str(state.get("entity_id", ""))
        if entity_id.split(".", 1)[0] not in CONTROLLABLE_DOMAINS:
            continue
        attributes = state.get("attributes")
        name = attributes.get("friendly_name") if isinstance(attributes, dict) else None
        if isinstance(name, str) and name.strip():
            names.append(name.strip())
    return names


class HassNames:
    """A cached, background-refreshed list of names from one Home Assistant."""

    def __init__(self, url: str, token: str, *, refresh_s: float = 300.0, max_names: int = 200) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.refresh_s = max(10.0, refresh_s)
        self.max_names = max_names
        self.names: tuple[str, ...] = ()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="asr-hass-names")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception as error:  # a flaky Home Assistant must not stop the service
                _LOGGER.warning("asr: fetching names from %s failed: %s", self.url, error)
            await asyncio.sleep(self.refresh_s)

    async def refresh(self) -> None:
        import aiohttp

        headers = {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"}
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(headers=headers, timeout=timeout) as session:
            async with session.get(f"{self.url}/api/states") as response:
                response.raise_for_status()
                states = await response.json()
            areas: list[str] = []
            async with session.post(
                f"{self.url}/api/template", json={"template": AREAS_TEMPLATE}
            ) as response:
                if response.status == 200:
                    with contextlib.suppress(ValueError):
                        parsed = json.loads(await response.text())
                        areas = [str(a) for a in parsed if a] if isinstance(parsed, list) else []
        unique: dict[str, str] = {}
        for name in [*areas, *names_from_states(states)]:
            unique.setdefault(name.lower(), name)
        self.names = tuple(list(unique.values())[: self.max_names])
        _LOGGER.info("asr: %d names from Home Assistant", len(self.names))
