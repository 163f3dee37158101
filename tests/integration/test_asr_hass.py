"""Names from a (local, fake) Home Assistant REST API reach the engine as hints."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable

import numpy as np
import pytest
import pytest_asyncio
from aiohttp import web

from tests.conftest import make_context, make_settings, requires_espeak
from wyoming_superwhisper.asr.client import pcm_bytes, transcribe
from wyoming_superwhisper.asr.engines import AsrRequest, AsrResult
from wyoming_superwhisper.asr.hass import HassNames
from wyoming_superwhisper.asr.service import AsrService
from wyoming_superwhisper.runtime.server import ServiceServer

TOKEN = "test-token"


@pytest_asyncio.fixture
async def fake_hass() -> AsyncIterator[str]:
    """Just enough of Home Assistant's REST API: states and the template endpoint."""

    def authorized(request: web.Request) -> None:
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            raise web.HTTPUnauthorized()

    async def states(request: web.Request) -> web.Response:
        authorized(request)
        return web.json_response(
            [
                {"entity_id": "light.kerguelen", "attributes": {"friendly_name": "Lampe Kerguelen"}},
                {"entity_id": "sensor.t", "attributes": {"friendly_name": "Température"}},
            ]
        )

    async def template(request: web.Request) -> web.Response:
        authorized(request)
        body = await request.json()
        assert "areas()" in body["template"]
        return web.Response(text='["Salon", "Grenier", "Rez-de-chaussée"]')

    app = web.Application()
    app.router.add_get("/api/states", states)
    app.router.add_post("/api/template", template)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def test_refresh_fetches_areas_floors_and_entities(fake_hass: str) -> None:
    names = HassNames(fake_hass, TOKEN)
    await names.refresh()
    assert names.names == ("Salon", "Grenier", "Rez-de-chaussée", "Lampe Kerguelen")


async def test_a_bad_token_keeps_the_last_list(fake_hass: str) -> None:
    names = HassNames(fake_hass, "wrong")
    names.names = ("Ancien",)
    with pytest.raises(Exception, match="401"):
        await names.refresh()
    assert names.names == ("Ancien",)


class RecordingEngine:
    name = "recording"
    device = "cpu"
    quality = 0
    model_name = "recording"
    languages: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.requests: list[AsrRequest] = []

    async def load(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def transcribe(self, request: AsrRequest, cancel: threading.Event | None = None) -> AsrResult:
        self.requests.append(request)
        return AsrResult(text="ok", language=request.language, engine=self.name)


@requires_espeak
async def test_service_uses_home_assistant_names_as_hints(
    fake_hass: str, speech: Callable[..., np.ndarray]
) -> None:
    engine = RecordingEngine()
    settings = make_settings(**{"asr.hass_url": fake_hass, "asr.hass_token": TOKEN})
    service = AsrService(make_context(settings), engines=[engine])
    assert service.hass is not None
    server = ServiceServer(service)
    await service.start()
    await server.start()
    try:
        await service.hass.refresh()  # the background task may not have run yet
        audio = np.concatenate(
            [np.zeros(4800, np.int16), speech("Allume la lampe."), np.zeros(8000, np.int16)]
        )
        exchange = await transcribe(server.port or 0, pcm_bytes(audio), names=["Cuisine"])
    finally:
        await server.stop(1.0)
        await service.stop()
    assert exchange.text == "ok"
    assert engine.requests[-1].names == ("Cuisine", "Salon", "Grenier", "Rez-de-chaussée", "Lampe Kerguelen")
