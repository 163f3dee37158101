"""What the ASR integration modules share: one whisper-base per module, lent to each test's service."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator

import pytest_asyncio

from tests.conftest import make_context
from wyoming_superwhisper.asr.engines import AsrRequest, AsrResult, WhisperEngine


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

    async def load(self) -> None:
        await self.inner.load()

    async def close(self) -> None:
        """The module fixture closes the real engine."""

    async def transcribe(self, request: AsrRequest, cancel: threading.Event | None = None) -> AsrResult:
        return await self.inner.transcribe(request, cancel)
