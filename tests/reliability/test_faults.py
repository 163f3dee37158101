"""Fault injection into real services: engines that fail to load, crash, hang or run out of
memory; a remote Wyoming fallback that hangs up mid-answer; a model file corrupted on disk.

Faults are injected by wrapping the engine object of one chain level of a real
service (``chain.levels[i].engine``); every other level is the real model.
What must hold: the next level answers within the configured timeout, the
request is not lost, the circuit opens after ``failure_threshold`` failures,
the metrics count it, and once the cooldown is over the primary is probed again
and serves when healthy. The circuit's clock is a test clock, so the cooldown
passes without sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from wyoming.event import Event, async_read_event, async_write_event

from tests.conftest import LOOPBACK, make_context, make_settings, requires_espeak, serving
from wyoming_superwhisper.handle.service import HandleService
from wyoming_superwhisper.runtime.server import WyomingService
from wyoming_superwhisper.tts.service import TtsService

from .support import RawClient, Received, audio_seconds, encode

pytestmark = [pytest.mark.asyncio, requires_espeak]

TIMEOUT_S = 1.0
THRESHOLD = 2
COOLDOWN_S = 30.0
ENGLISH = "Hello, this is a test of the fallback voice."


class Faulty:
    """Wraps a real engine; ``mode`` decides what the next load or call does."""

    def __init__(self, inner: Any, mode: str | None) -> None:
        self.inner = inner
        self.mode = mode
        self.calls = 0
        self.name = inner.name
        self.device = inner.device
        self.quality = inner.quality

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def load(self) -> None:
        if self.mode == "load":
            raise OSError("en_US-joe-medium.onnx: protobuf parsing failed (truncated file)")
        await self.inner.load()

    async def close(self) -> None:
        await self.inner.close()

    async def _fault(self) -> None:
        self.calls += 1
        if self.mode == "raise":
            raise RuntimeError("onnxruntime: invalid input tensor")
        if self.mode == "hang":
            await asyncio.sleep(3600)
        if self.mode == "oom":
            raise MemoryError()
        if self.mode == "cuda-oom":
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    async def synthesize(self, text: str, options: Any) -> Any:
        await self._fault()
        return await self.inner.synthesize(text, options)

    def synthesize_stream(self, text: str, options: Any) -> Any:
        """A chunked Piper voice's path (``tts.chunked_decode``): the same faults, before its first piece."""

        async def faulty_parts() -> AsyncIterator[Any]:
            await self._fault()
            async with contextlib.aclosing(self.inner.synthesize_stream(text, options)) as inner:
                async for part in inner:
                    yield part

        return faulty_parts()

    def stream(self, request: Any) -> Any:
        async def faulty_stream() -> AsyncIterator[Any]:
            await self._fault()
            async with contextlib.aclosing(self.inner.stream(request)) as inner:
                async for delta in inner:
                    yield delta

        return faulty_stream()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def sample(service: WyomingService, name: str, labels: dict[str, str]) -> float:
    value = service.context.metrics.registry.get_sample_value(name, labels)
    return float(value or 0.0)


async def ask(port: int, raw: bytes, last: tuple[str, ...], timeout_s: float) -> Received:
    client = await RawClient.connect(port)
    try:
        assert await client.send(raw)
        received = await client.read_until(lambda r: bool(r.events) and r.events[-1].type in last, timeout_s)
        assert not received.timed_out and not received.eof, received.types()
        return received
    finally:
        await client.close()


async def speak_english(port: int) -> Received:
    raw = encode("synthesize", {"text": ENGLISH, "voice": {"language": "en"}})
    # Bounded by the two levels' timeouts, never a speed assertion.
    received = await ask(port, raw, ("audio-stop", "error"), THRESHOLD * TIMEOUT_S + 30)
    assert received.types()[-1] == "audio-stop", received.types()
    assert 1.0 < audio_seconds(received.events) < 8.0
    return received


def tts_settings(**extra: Any) -> Any:
    return make_settings(
        **{
            "tts.timeout_s": TIMEOUT_S,
            "tts.failure_threshold": THRESHOLD,
            "tts.cooldown_s": COOLDOWN_S,
            "tts.cache_mb": 0,  # every request reaches the voices: the chain is under test
            **extra,
        }
    )


@pytest.mark.parametrize("mode", ["raise", "hang", "oom", "cuda-oom", "load"])
async def test_tts_primary_fault_falls_back_opens_circuit_and_recovers(mode: str) -> None:
    service = TtsService(make_context(tts_settings()))
    chain = service.routes["en"]
    assert [lv.engine.name for lv in chain.levels] == ["piper-joe", "espeak-en"]
    faulty = Faulty(chain.levels[0].engine, mode)
    chain.levels[0].engine = faulty
    clock = Clock()
    for level in chain.levels:
        level.breaker.clock = clock
    attempts = "superwhisper_engine_attempts_total"
    async with serving(service) as server:
        assert server.port is not None
        outcome = {
            "raise": "failed", "hang": "timeout", "oom": "out_of_memory",
            "cuda-oom": "out_of_memory", "load": "load_failed",
        }[mode]  # fmt: skip
        failures_at_start = 1 if mode == "load" else 0  # the warm-up load counts as one
        for _ in range(3):
            await speak_english(server.port)
        labels = {"service": "tts.en", "engine": "piper-joe", "outcome": outcome}
        failed = sample(service, attempts, labels)
        assert failed == THRESHOLD, (mode, failed)
        if mode != "load":
            assert faulty.calls == THRESHOLD  # the third request skipped the open circuit
        assert sample(service, attempts, {"service": "tts.en", "engine": "espeak-en", "outcome": "ok"}) == 3
        assert sample(service, "superwhisper_requests_total", {"service": "tts", "outcome": "fallback"}) == 3
        assert (
            sample(service, "superwhisper_circuit_state", {"service": "tts.en", "engine": "piper-joe"}) == 2
        )
        skipped = {"service": "tts.en", "engine": "piper-joe", "outcome": "skipped"}
        assert sample(service, attempts, skipped) == 3 - THRESHOLD + failures_at_start
        # Healed, but the cooldown is not over: still served by the fallback.
        faulty.mode = None
        await speak_english(server.port)
        assert sample(service, "superwhisper_requests_total", {"service": "tts", "outcome": "fallback"}) == 4
        # After the cooldown the primary is probed and serves again.
        clock.now += COOLDOWN_S + 1
        await speak_english(server.port)
        assert sample(service, attempts, {"service": "tts.en", "engine": "piper-joe", "outcome": "ok"}) == 1
        assert sample(service, "superwhisper_requests_total", {"service": "tts", "outcome": "ok"}) == 1
        assert (
            sample(service, "superwhisper_circuit_state", {"service": "tts.en", "engine": "piper-joe"}) == 0
        )
        await speak_english(server.port)
        assert sample(service, attempts, {"service": "tts.en", "engine": "piper-joe", "outcome": "ok"}) == 2


@pytest.mark.parametrize("mode", ["hang", "cuda-oom", "raise"])
async def test_handle_primary_fault_falls_back_to_the_next_llm(mode: str) -> None:
    smollm = {"model": "smollm2-135m", "device": "cpu"}
    settings = make_settings(
        **{
            "handle.chain": [smollm, smollm],
            "handle.max_tokens": 8,
            "handle.timeout_s": 10.0,
            "handle.first_token_timeout_s": 2.0,  # a hung level hands over after 2 s
            "handle.failure_threshold": THRESHOLD,
            "handle.cooldown_s": COOLDOWN_S,
        }
    )
    service = HandleService(make_context(settings))
    faulty = Faulty(service.chain.levels[0].engine, mode)
    service.chain.levels[0].engine = faulty
    clock = Clock()
    for level in service.chain.levels:
        level.breaker.clock = clock
    async with serving(service) as server:
        assert server.port is not None
        for _ in range(3):
            raw = encode("transcript", {"text": "Bonjour, comment vas-tu ?", "language": "fr"})
            received = await ask(server.port, raw, ("handled-stop", "not-handled", "error"), 60)
            assert received.types()[-1] == "handled-stop", received.types()
        assert faulty.calls == THRESHOLD
        engine = faulty.name
        outcome = {"hang": "timeout", "cuda-oom": "out_of_memory", "raise": "failed"}[mode]
        labels = {"service": "handle", "engine": engine, "outcome": outcome}
        assert sample(service, "superwhisper_engine_attempts_total", labels) == THRESHOLD
        assert sample(service, "superwhisper_circuit_state", {"service": "handle", "engine": engine}) == 2
        assert (
            sample(service, "superwhisper_requests_total", {"service": "handle", "outcome": "fallback"}) == 3
        )
        faulty.mode = None
        clock.now += COOLDOWN_S + 1
        raw = encode("transcript", {"text": "Bonjour, comment vas-tu ?", "language": "fr"})
        received = await ask(server.port, raw, ("handled-stop", "not-handled", "error"), 60)
        assert received.types()[-1] == "handled-stop"
        # The primary was probed again. (Whether its answer passes the quality gate of a
        # non-last level is SmolLM2's business: with 8 tokens it is often cut off.)
        assert faulty.calls == THRESHOLD + 1


# --- a remote fallback that hangs up mid-answer ------------------------------------------------


@contextlib.asynccontextmanager
async def dropping_server() -> AsyncIterator[tuple[int, list[str]]]:
    """A Wyoming TTS peer that starts an answer (audio-start, one chunk) and hangs up."""
    seen: list[str] = []

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        event = await async_read_event(reader)
        seen.append(event.type if event is not None else "eof")
        await async_write_event(Event("audio-start", {"rate": 22050, "width": 2, "channels": 1}), writer)
        chunk = Event("audio-chunk", {"rate": 22050, "width": 2, "channels": 1}, payload=bytes(4410))
        await async_write_event(chunk, writer)
        writer.close()

    server = await asyncio.start_server(on_client, LOOPBACK, 0)
    try:
        yield server.sockets[0].getsockname()[1], seen
    finally:
        server.close()
        await server.wait_closed()


async def test_remote_fallback_dropping_mid_answer_gives_the_next_level() -> None:
    async with dropping_server() as (port, seen):
        voices = {
            "fr": [{"model": "espeak-fr"}],
            "en": [{"remote": f"tcp://{LOOPBACK}:{port}"}, {"model": "espeak-en"}],
        }
        service = TtsService(make_context(tts_settings(**{"tts.voices": voices})))
        async with serving(service) as server:
            assert server.port is not None
            await speak_english(server.port)
            assert "synthesize" in seen
            labels = {"service": "tts.en", "engine": service.routes["en"].levels[0].engine.name,
                      "outcome": "failed"}  # fmt: skip
            assert sample(service, "superwhisper_engine_attempts_total", labels) >= 1


async def test_remote_as_the_only_level_dropping_gives_a_clear_error() -> None:
    async with dropping_server() as (port, _):
        voices = {"fr": [{"model": "espeak-fr"}], "en": [{"remote": f"tcp://{LOOPBACK}:{port}"}]}
        service = TtsService(make_context(tts_settings(**{"tts.voices": voices})))
        async with serving(service) as server:
            assert server.port is not None
            raw = encode("synthesize", {"text": ENGLISH, "voice": {"language": "en"}})
            received = await ask(server.port, raw, ("audio-stop", "error"), 30)
            error = received.events[-1]
            assert error.type == "error" and error.data["code"] == "synthesis-failed", error
            assert "closed the connection mid-answer" in error.data["text"]
            # The same server still answers French.
            raw = encode("synthesize", {"text": "Bonjour à tous."})
            received = await ask(server.port, raw, ("audio-stop", "error"), 30)
            assert received.types()[-1] == "audio-stop"


# --- a model file corrupted on disk -------------------------------------------------------------


def cli(*args: str, models_dir: Path, by_env: bool = False) -> subprocess.CompletedProcess[str]:
    """The real CLI in a subprocess, with the models root given as a setting or in the environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUPERWHISPER_")}
    root = ["--set", f"models.roots=['{models_dir}']"]
    if by_env:
        env["SUPERWHISPER_MODELS_DIR"] = str(models_dir)
        root = []
    return subprocess.run(
        [sys.executable, "-m", "wyoming_superwhisper", *args, *root, "--set", "models.environment=test"],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )  # fmt: skip


@pytest.fixture
def corrupt_joe(tmp_path: Path) -> Path:
    """A models root holding a copy of piper-joe whose ONNX file lost its second half."""
    source = make_context().registry.resolve("piper-joe").path
    root = tmp_path / "models"
    target = root / "piper-joe"
    target.mkdir(parents=True)
    for name in ("en_US-joe-medium.onnx", "en_US-joe-medium.onnx.json"):
        shutil.copyfile(source / name, target / name)
    onnx = target / "en_US-joe-medium.onnx"
    size = onnx.stat().st_size
    with onnx.open("r+b") as handle:
        handle.truncate(size // 2)
    return root


async def test_corrupted_voice_is_reported_and_the_service_falls_back(corrupt_joe: Path) -> None:
    verify = await asyncio.to_thread(cli, "models", "verify", "piper-joe", models_dir=corrupt_joe)
    assert verify.returncode != 0, verify.stdout
    assert "sha256" in verify.stdout and "differs" in verify.stdout, verify.stdout
    doctor = await asyncio.to_thread(
        cli,
        "doctor",
        "--only",
        "tts",
        "--no-smoke",
        "--set",
        "models.environment=test",
        models_dir=corrupt_joe,
    )
    report = doctor.stdout + doctor.stderr
    assert "piper-joe" in report and "differs" in report, report
    assert "degraded" in report.lower(), report

    service = TtsService(make_context(tts_settings(**{"models.roots": [str(corrupt_joe)]})))
    chain = service.routes["en"]
    assert str(corrupt_joe) in str(chain.levels[0].engine.model_path)
    async with serving(service) as server:
        assert server.port is not None
        await speak_english(server.port)
        labels = {"service": "tts.en", "engine": "espeak-en", "outcome": "ok"}
        assert sample(service, "superwhisper_engine_attempts_total", labels) == 1
        assert "load_failed" in chain.levels[0].last_error


async def test_models_dir_variable_is_accepted_by_the_cli(corrupt_joe: Path) -> None:
    args = ("models", "verify", "piper-joe")
    verify = await asyncio.to_thread(cli, *args, models_dir=corrupt_joe, by_env=True)
    assert "sha256" in verify.stdout and "differs" in verify.stdout, verify.stdout + verify.stderr
