"""What the ASR integration modules share: one whisper-base per module, lent to each test's service."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest_asyncio

from tests.conftest import make_context, make_settings
from wyoming_superwhisper.asr.engines import AsrEngine, AsrRequest, AsrResult, WhisperEngine
from wyoming_superwhisper.asr.service import AsrService
from wyoming_superwhisper.runtime.server import ServiceServer


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def whisper() -> AsyncIterator[WhisperEngine]:
    """The embedded whisper-base, loaded once per module (CPU, int8)."""
    resolved = make_context().registry.resolve("whisper-base")
    engine = WhisperEngine(
        resolved.entry_path,
        model_name="whisper-base",
        device="cpu",
        compute_type="int8",
        languages=resolved.spec.languages,
    )
    await engine.load()
    yield engine
    await engine.close()


class SharedEngine:
    """The module's loaded engine, lent to a test's service; closing it is a no-op."""

    def __init__(self, inner: WhisperEngine) -> None:
        self.inner = inner
        self.name = inner.name
        self.device = inner.device
        self.quality = inner.quality
        self.model_name = inner.model_name
        self.languages = inner.languages
        self.decoded_seconds: list[float] = []
        """The length of every request's audio, in order (what the server handed to Whisper)."""

    async def load(self) -> None:
        await self.inner.load()

    async def close(self) -> None:
        """The module fixture closes the real engine."""

    async def transcribe(self, request: AsrRequest, cancel: threading.Event | None = None) -> AsrResult:
        self.decoded_seconds.append(request.seconds)
        return await self.inner.transcribe(request, cancel)


@contextlib.asynccontextmanager
async def running(
    engines: Sequence[AsrEngine], **settings: Any
) -> AsyncIterator[tuple[AsrService, ServiceServer]]:
    """An ASR service on ``engines`` and its server on loopback; ``settings`` without a dot
    are ``asr.`` keys."""
    overrides = {key if "." in key else f"asr.{key}": value for key, value in settings.items()}
    service = AsrService(make_context(make_settings(**overrides)), engines=engines)
    server = ServiceServer(service)
    await service.start()
    await server.start()
    try:
        yield service, server
    finally:
        await server.stop(2.0)
        await service.stop()
