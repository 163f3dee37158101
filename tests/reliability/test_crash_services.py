"""A native crash through the real servers: the client still gets its answer, the worker comes back.

For each service, level 0 is :class:`tests.faults.CrashingEngine` in a real
worker process (it segfaults, aborts, is SIGKILLed from outside, or hangs)
and level 1 is a real engine (faster-whisper, SmolLM2 through llama.cpp,
espeak-ng). A real Wyoming client talks to the real server over TCP. Then
``serve``'s shape: three services in one process, the LLM's worker crashing
in a loop, ASR and TTS answering all along, ``/readyz`` and ``/status``
saying why the handle service is not ready.
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from wyoming.asr import Transcribe, Transcript
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncTcpClient
from wyoming.event import Event
from wyoming.tts import Synthesize, SynthesizeVoice

from tests.conftest import LOOPBACK, make_context, make_settings, requires_espeak, serving
from tests.faults import CrashingEngine
from wyoming_superwhisper.asr.engines import WhisperEngine
from wyoming_superwhisper.asr.service import AsrService
from wyoming_superwhisper.handle.engines import LlamaCppEngine
from wyoming_superwhisper.handle.service import HandleService
from wyoming_superwhisper.runtime.fallback import FallbackChain
from wyoming_superwhisper.runtime.server import Runtime, ServiceContext, WyomingService
from wyoming_superwhisper.runtime.worker import EngineWorker, WorkerOptions, supervised, worker_options
from wyoming_superwhisper.tts.service import TtsService

pytestmark = [requires_espeak, pytest.mark.slow]

FAST = WorkerOptions(cancel_grace_s=0.5, restart_backoff_s=0.1, max_backoff_s=0.5)
CAUSES = {"segv": "SIGSEGV", "abort": "SIGABRT", "kill": "SIGKILL", "hang": "hang"}
SUPERVISION = {
    "server.worker_cancel_grace_s": 0.5,
    "server.worker_restart_backoff_s": 0.1,
    "server.worker_max_backoff_s": 0.5,
}


def crashing(mode: str, name: str) -> EngineWorker:
    engine = supervised(
        FAST,
        CrashingEngine,
        "slow" if mode == "kill" else mode,
        name=name,
        calls=("transcribe", "synthesize"),
        streams=("stream",),
    )
    assert isinstance(engine, EngineWorker)
    return engine


async def kill_while_busy(engine: EngineWorker, after_s: float = 1.0) -> None:
    """SIGKILL the worker from outside once the request is in it (the OOM killer's way)."""
    await asyncio.sleep(after_s)
    pid = engine.worker_status()["pid"]
    assert pid is not None
    os.kill(pid, signal.SIGKILL)


async def until(predicate: Callable[[], bool], timeout_s: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


def crashes(context: ServiceContext, service: str, level: str, cause: str) -> float:
    return float(context.metrics.engine_crashes.labels(service, level, cause)._value.get())


async def exchange(port: int, events: list[Event], last: tuple[str, ...]) -> list[Event]:
    received: list[Event] = []
    async with AsyncTcpClient(LOOPBACK, port) as client:
        for event in events:
            await client.write_event(event)
        while True:
            event = await asyncio.wait_for(client.read_event(), 60)
            assert event is not None, "the server closed the connection"
            received.append(event)
            if event.type in (*last, "error"):
                return received


def transcribe_events(samples: np.ndarray) -> list[Event]:
    pcm = samples.astype("<i2").tobytes()
    events = [Transcribe(language="fr").event(), AudioStart(rate=16000, width=2, channels=1).event()]
    events += [
        AudioChunk(rate=16000, width=2, channels=1, audio=pcm[i : i + 3200]).event()
        for i in range(0, len(pcm), 3200)
    ]
    return [*events, AudioStop().event()]


def audio_bytes(events: list[Event]) -> int:
    return sum(len(e.payload or b"") for e in events if e.type == "audio-chunk")


# --- one service at a time -------------------------------------------------------


@pytest.mark.parametrize("mode", list(CAUSES))
async def test_asr_answers_from_the_next_level_when_its_engine_crashes(
    mode: str, speech: Callable[..., np.ndarray]
) -> None:
    settings = make_settings(**{**SUPERVISION, "asr.timeout_s": 4.0, "asr.cooldown_s": 60})
    context = make_context(settings)
    whisper_model = context.registry.resolve("whisper-base")
    broken = crashing(mode, "faster-whisper:broken@cpu")
    whisper = supervised(
        worker_options(settings),
        WhisperEngine,
        whisper_model.entry_path,
        model_name="whisper-base",
        languages=("fr", "en"),
        calls=("transcribe",),
    )
    service = AsrService(context, engines=[broken, whisper])
    audio = np.concatenate(
        [
            np.zeros(4800, np.int16),
            speech("Quelle est la capitale de la France ?", "fr"),
            np.zeros(8000, np.int16),
        ]
    )
    async with serving(service) as server:
        await service.chain.load(1)
        killer = asyncio.create_task(kill_while_busy(broken)) if mode == "kill" else None
        events = await exchange(server.port or 0, transcribe_events(audio), ("transcript",))
        if killer is not None:
            await killer
        transcript = Transcript.from_event(events[-1]) if events[-1].type == "transcript" else None
        assert transcript is not None, [e.type for e in events]
        assert "capitale" in transcript.text.lower()  # whisper-base heard it: level 1 answered
        await until(lambda: crashes(context, "asr", "0", CAUSES[mode]) == 1)
        level = service.status()["chains"]["asr"][0]
        assert level["circuit"] == "open" and level["worker"]["last_crash"] == CAUSES[mode]
        await until(lambda: broken.worker_status()["state"] == "ready")  # restarted
        assert broken.worker_status()["restarts"] == 1


@pytest.mark.parametrize("mode", list(CAUSES))
async def test_handle_answers_from_the_next_level_when_its_llm_crashes(mode: str) -> None:
    settings = make_settings(
        **{
            **SUPERVISION,
            "handle.cooldown_s": 60,
            "handle.first_token_timeout_s": 2.0,
            "handle.timeout_s": 30,
        }
    )
    context = make_context(settings)
    model = context.registry.resolve("smollm2-135m")
    broken = crashing(mode, "llama-cpp:broken@cpu")
    llm = supervised(
        worker_options(settings),
        LlamaCppEngine,
        model.entry_path,
        ref="smollm2-135m",
        options={"n_ctx": 2048, "temperature": 0.0},
        streams=("stream",),
    )
    service = HandleService(context, engines=[broken, llm])
    async with serving(service) as server:
        await service.chain.load(1)
        killer = asyncio.create_task(kill_while_busy(broken)) if mode == "kill" else None
        events = await exchange(
            server.port or 0,
            [Transcript(text="Quelle est la capitale de la France ?", language="fr").event()],
            ("handled-stop", "not-handled"),
        )
        if killer is not None:
            await killer
        handled = [e for e in events if e.type == "handled"]
        assert handled and str(handled[0].data["text"]).strip(), [e.type for e in events]
        await until(lambda: crashes(context, "handle", "0", CAUSES[mode]) == 1)
        level = service.status()["chains"]["handle"][0]
        assert level["circuit"] == "open" and level["worker"]["last_crash"] == CAUSES[mode]
        await until(lambda: broken.worker_status()["state"] == "ready")


@pytest.mark.parametrize("mode", list(CAUSES))
async def test_tts_speaks_with_the_next_voice_when_its_engine_crashes(mode: str) -> None:
    settings = make_settings(**{**SUPERVISION, "tts.timeout_s": 2.0, "tts.cooldown_s": 60})
    context = make_context(settings)
    service = TtsService(context)
    chain = service.routes["en"]
    broken = crashing(mode, "piper:broken")
    _replace_level(chain, 0, broken)
    async with serving(service) as server:
        killer = asyncio.create_task(kill_while_busy(broken, 0.5)) if mode == "kill" else None
        events = await exchange(
            server.port or 0,
            [
                Synthesize(
                    text="Hello, the kitchen light is on.", voice=SynthesizeVoice(name="piper-joe")
                ).event()
            ],
            ("audio-stop",),
        )
        if killer is not None:
            await killer
        assert events[-1].type == "audio-stop", [e.type for e in events]
        assert audio_bytes(events) > 16000  # espeak-ng said it
        await until(lambda: crashes(context, "tts.en", "0", CAUSES[mode]) == 1)
        await until(lambda: broken.worker_status()["state"] == "ready")


def _replace_level(chain: FallbackChain[Any], index: int, engine: EngineWorker) -> None:
    """Put a crashing worker at one level of a chain the service built from its config."""
    chain.levels[index].engine = engine
    engine.watch_crashes(functools.partial(chain._crashed, index))


async def test_a_crashed_level_serves_again_after_its_restart_and_probe(tmp_path: Path) -> None:
    """The marker makes the engine crash once: after the restart the half-open probe succeeds."""
    settings = make_settings(**{**SUPERVISION, "handle.cooldown_s": 1.0})
    context = make_context(settings)
    once = supervised(
        FAST,
        CrashingEngine,
        "segv",
        name="llama-cpp:once@cpu",
        marker=str(tmp_path / "m"),
        streams=("stream",),
    )
    spare = supervised(FAST, CrashingEngine, "ok", name="llama-cpp:spare@cpu", text="Je suis la réserve.")
    service = HandleService(context, engines=[once, spare])
    question = [Transcript(text="Bonjour !", language="fr").event()]
    async with serving(service) as server:
        await service.chain.load(1)
        first = await exchange(server.port or 0, question, ("handled-stop", "not-handled"))
        assert [e.data["text"] for e in first if e.type == "handled"] == ["Je suis la réserve."]
        await asyncio.sleep(1.2)  # cooldown: the next request probes level 0, restarted by now
        second = await exchange(server.port or 0, question, ("handled-stop", "not-handled"))
        assert [e.data["text"] for e in second if e.type == "handled"] == ["Bonjour, je suis revenu."]
        assert service.status()["chains"]["handle"][0]["circuit"] == "closed"


# --- serve: three services, the LLM crashing in a loop ----------------------------------


async def test_serve_keeps_asr_and_tts_answering_while_the_llm_worker_crashes_in_a_loop(
    speech: Callable[..., np.ndarray],
) -> None:
    settings = make_settings(**{**SUPERVISION, "handle.cooldown_s": 0.3})
    context = make_context(settings)
    llm = supervised(FAST, CrashingEngine, "segv", name="llama-cpp:broken@cpu", streams=("stream",))
    services: list[WyomingService] = [
        AsrService(context),
        HandleService(context, engines=[llm]),
        TtsService(context),
    ]
    runtime = Runtime(services, context, smoke=True)
    await runtime.start()  # the handle smoke crashes: logged, the other services serve
    try:
        ports = {s.service.name: s.port or 0 for s in runtime.servers}
        audio = np.concatenate(
            [
                np.zeros(4800, np.int16),
                speech("Quelle est la capitale de la France ?", "fr"),
                np.zeros(8000, np.int16),
            ]
        )
        for _ in range(3):
            handled = await exchange(
                ports["handle"],
                [Transcript(text="Allume la cuisine.", language="fr").event()],
                ("handled-stop", "not-handled"),
            )
            assert handled[-1].type == "not-handled"  # a spoken apology, never a reset socket
            said = await exchange(ports["tts"], [Synthesize(text="Il est midi.").event()], ("audio-stop",))
            assert audio_bytes(said) > 8000
            heard = await exchange(ports["asr"], transcribe_events(audio), ("transcript",))
            assert heard[-1].type == "transcript" and "capitale" in str(heard[-1].data["text"]).lower()
            await asyncio.sleep(0.4)  # past the cooldown: the next request probes the LLM again
        await until(lambda: crashes(context, "handle", "0", "SIGSEGV") >= 3)
        assert llm.worker_status()["restarts"] >= 2  # it crashes in a loop and keeps coming back
        assert runtime._ops is not None
        base = f"http://{LOOPBACK}:{runtime._ops.port}"
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{base}/readyz") as resp:
                ready = await resp.json()
            async with http.get(f"{base}/status") as resp:
                status = await resp.json()
            async with http.get(f"{base}/metrics") as resp:
                metrics = await resp.text()
        handle_status = next(s for s in status["services"] if s["service"] == "handle")
        worker = handle_status["chains"]["handle"][0]["worker"]
        assert worker["last_crash"] == "SIGSEGV" and worker["crashes"] >= 3
        if not ready["ready"]:  # not ready while the circuit is open: the reason names the crash
            assert any("SIGSEGV" in reason for reason in ready["reasons"]), ready
        assert 'superwhisper_engine_crashes_total{level="0",service="handle",signal="SIGSEGV"}' in metrics
        asr_status = next(s for s in status["services"] if s["service"] == "asr")
        assert asr_status["ready"] and asr_status["vad"] is None  # Silero in process by default
    finally:
        await runtime.shutdown()
