"""Shared fixtures: settings, a service context on the CPU, a running server, speech audio.

Real models come from the PyPI model packages the project's setup installs
(see scripts/setup.sh); speech comes from espeak-ng (Debian). Nothing is
downloaded from a hub.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import subprocess
import wave
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from wyoming.error import Error
from wyoming.event import Event

from wyoming_superwhisper.config import Settings, load_settings
from wyoming_superwhisper.runtime.gpu import GpuDecision, choose_gpu
from wyoming_superwhisper.runtime.metrics import Metrics
from wyoming_superwhisper.runtime.registry import ModelRegistry
from wyoming_superwhisper.runtime.server import ServiceContext, ServiceServer, WyomingService

LOOPBACK = "127.0.0.1"


def make_settings(**overrides: Any) -> Settings:
    """Settings for tests: test model environment, loopback, OS-chosen ports, no zeroconf."""
    base: dict[str, Any] = {
        "models.environment": "test",
        "asr.uri": f"tcp://{LOOPBACK}:0",
        "handle.uri": f"tcp://{LOOPBACK}:0",
        "tts.uri": f"tcp://{LOOPBACK}:0",
        "metrics.host": LOOPBACK,
        "metrics.port": 0,
        "zeroconf.enabled": False,
    }
    base.update(overrides)
    return load_settings(environ={}, overrides=base)


def make_context(settings: Settings | None = None) -> ServiceContext:
    settings = settings or make_settings()
    decision: GpuDecision = choose_gpu(None, settings.gpu)
    return ServiceContext(
        settings=settings,
        registry=ModelRegistry.from_settings(settings),
        gpu=decision,
        metrics=Metrics(CollectorRegistry()),
    )


@pytest.fixture
def settings_factory() -> Callable[..., Settings]:
    return make_settings


@pytest.fixture
def context_factory() -> Callable[..., ServiceContext]:
    return make_context


@contextlib.asynccontextmanager
async def serving(service: WyomingService) -> AsyncIterator[ServiceServer]:
    """Start a service (warm-up included) on its URI; yields the server (``.port``)."""
    server = ServiceServer(service)
    await service.start()
    await server.start()
    try:
        yield server
    finally:
        await server.stop(2.0)
        await service.stop()


@pytest.fixture
def serve() -> Callable[[WyomingService], contextlib.AbstractAsyncContextManager[ServiceServer]]:
    return serving


class HangsUpAfter:
    """A client connection that closes once it has read an event of type ``last``.

    Home Assistant reads ``transcript`` or ``handled`` and closes: every later
    write of the server fails, as on a real socket whose peer has gone.
    """

    peer = f"{LOOPBACK}:1"
    closed = False

    def __init__(self, last: str) -> None:
        self.last = last
        self.events: list[Event] = []

    async def write(self, event: Event) -> None:
        if self.events and self.events[-1].type == self.last:
            raise ConnectionResetError("the client has closed")
        self.events.append(event)

    async def error(self, text: str, code: str) -> None:
        self.events.append(Error(text=text, code=code).event())


# --- speech made by espeak-ng ---------------------------------------------------

ESPEAK = shutil.which("espeak-ng")
requires_espeak = pytest.mark.skipif(ESPEAK is None, reason="espeak-ng (Debian package) not installed")


def espeak_pcm(text: str, voice: str, rate: int = 16000, speed: int = 150) -> np.ndarray:
    """Speech for a text as int16 mono PCM at ``rate`` (espeak-ng speaks at 22050 Hz)."""
    assert ESPEAK is not None
    raw = subprocess.run(
        [ESPEAK, "-v", voice, "-s", str(speed), "--stdout", text], check=True, capture_output=True
    ).stdout
    with wave.open(io.BytesIO(_fix_wav_sizes(raw))) as wav:
        native = wav.getframerate()
        samples = np.frombuffer(wav.readframes(wav.getnframes()), dtype=np.int16)
    if native == rate:
        return samples
    duration = len(samples) / native
    target = np.linspace(0, len(samples) - 1, int(duration * rate))
    return np.interp(target, np.arange(len(samples)), samples).astype(np.int16)


def _fix_wav_sizes(data: bytes) -> bytes:
    """Rewrite RIFF/data sizes (espeak-ng leaves 0x7fffffff when writing to a pipe)."""
    import struct

    buf = bytearray(data)
    struct.pack_into("<I", buf, 4, len(buf) - 8)
    index = buf.find(b"data")
    if index >= 0:
        struct.pack_into("<I", buf, index + 4, len(buf) - index - 8)
    return bytes(buf)


@pytest.fixture(scope="session")
def speech() -> Iterator[Callable[..., np.ndarray]]:
    """``speech(text, voice='fr', rate=16000)`` → int16 PCM, cached per session."""
    if ESPEAK is None:
        pytest.skip("espeak-ng (Debian package) not installed")
    cache: dict[tuple[str, str, int], np.ndarray] = {}

    def make(text: str, voice: str = "fr", rate: int = 16000) -> np.ndarray:
        key = (text, voice, rate)
        if key not in cache:
            cache[key] = espeak_pcm(text, voice, rate)
        return cache[key]

    yield make


@pytest.fixture
def tmp_models(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    root.mkdir()
    return root
