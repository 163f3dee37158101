"""The ASR server end to end: real whisper-base, real Silero, real TCP, the wyoming client.

One whisper-base engine is loaded for the whole module (one event loop for
the module); each test builds its own :class:`AsrService` around it, with the
settings it needs, so decode counters start at zero. Speech comes from
espeak-ng. Fakes appear only where the chain or the handler is what is under
test (a broken level, a decode held back to fill the queue).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import jiwer
import numpy as np
import pytest
from wyoming.asr import Transcribe, Transcript
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncTcpClient
from wyoming.info import Describe, Info

from tests.conftest import HangsUpAfter, make_context, make_settings, requires_espeak
from tests.integration.conftest import SharedEngine, running
from wyoming_superwhisper.asr.client import Exchange, pcm_bytes, transcribe
from wyoming_superwhisper.asr.engines import (
    FULL_WINDOW_FRAMES,
    AsrEngine,
    AsrRequest,
    AsrResult,
    RemoteWyomingEngine,
    WhisperEngine,
    normalize,
)
from wyoming_superwhisper.asr.service import AsrService
from wyoming_superwhisper.asr.vad import VadStream
from wyoming_superwhisper.runtime.fallback import EngineError
from wyoming_superwhisper.runtime.server import ServiceServer

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.slow, requires_espeak]

RATE = 16000

# Sentences whisper-base reads at temperature 0 from espeak-ng's voice (no sampling
# fallback, so the output is the same on every run).
FRENCH = [
    "Bonjour, quelle heure est-il ?",
    "Mets de la musique dans la cuisine.",
    "Je voudrais un café s'il vous plaît.",
    "Ferme la porte du garage.",
    "Quelle est la capitale de la France ?",
    "Ouvre les volets de la chambre.",
]
# Measured on these six with whisper-base int8, beam 5, temperature 0: WER 0.30 with the
# 10 s encoder window and with Whisper's full 30 s (espeak-ng's robotic French: "Femme la
# porte du gammage", "Madame de la musique"). 0.5 leaves room for CTranslate2/CPU kernel
# differences, and still fails if trimming cuts words off, if the language is lost
# (English output gives WER ≈ 1) or if the audio is mangled.
FRENCH_MAX_WER = 0.5
ENGLISH = [
    "Turn on the kitchen lights please.",
    "What is the weather like tomorrow?",
    "Play some music in the living room.",
    "Close the garage door.",
]
# Measured: 0.09 on these four with either encoder window ("light" for "lights", "winner"
# for "weather"). 0.25 allows one more word wrong in four sentences.
ENGLISH_MAX_WER = 0.25


def words(text: str) -> str:
    return " ".join(re.sub(r"[^\w' ]", " ", normalize(text).replace("-", " ")).split())


def wer(references: Sequence[str], hypotheses: Sequence[str | None]) -> float:
    return float(jiwer.wer([words(r) for r in references], [words(h or "") for h in hypotheses]))


class BrokenEngine:
    """A level whose model will not load (a corrupt file, a missing library)."""

    name = "broken:whisper-base@cpu"
    device = "cpu"
    quality = 9
    model_name = "whisper-base"
    languages: tuple[str, ...] = ()

    async def load(self) -> None:
        raise OSError("model.bin: unexpected end of file")

    async def close(self) -> None:
        return None

    async def transcribe(self, request: AsrRequest, cancel: threading.Event | None = None) -> AsrResult:
        raise EngineError("not loaded")


class GatedEngine:
    """Answers only when the test opens the gate: holds a decode in flight on purpose."""

    name = "gated"
    device = "cpu"
    quality = 0
    model_name = "gated"
    languages: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.entered = asyncio.Event()

    async def load(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def transcribe(self, request: AsrRequest, cancel: threading.Event | None = None) -> AsrResult:
        self.entered.set()
        await self.gate.wait()
        return AsrResult(text="ouvert", language=request.language, engine=self.name)


@pytest.fixture
def shared(whisper: WhisperEngine) -> Callable[[], list[AsrEngine]]:
    return lambda: [SharedEngine(whisper)]


def padded(samples: np.ndarray, before_s: float = 0.3, after_s: float = 0.6) -> np.ndarray:
    """Speech with silence around it, as a microphone would send it."""
    return np.concatenate(
        [np.zeros(int(before_s * RATE), np.int16), samples, np.zeros(int(after_s * RATE), np.int16)]
    )


def trimmed(samples: np.ndarray) -> np.ndarray:
    """espeak-ng's speech without its own leading/trailing silence."""
    loud = np.flatnonzero(np.abs(samples.astype(np.int32)) > 300)
    return samples[loud[0] : loud[-1] + 1]


def pink_noise(seconds: float, level: float = 0.1, seed: int = 7) -> np.ndarray:
    rng = np.random.default_rng(seed)
    count = int(seconds * RATE)
    spectrum = np.fft.rfft(rng.standard_normal(count))
    spectrum /= np.sqrt(np.arange(1, len(spectrum) + 1))
    noise = np.fft.irfft(spectrum, count)
    noise = noise / np.max(np.abs(noise)) * level
    return (noise * 32767).astype(np.int16)


# --- protocol ---------------------------------------------------------------------------


async def describe(port: int) -> Info:
    async with AsyncTcpClient("127.0.0.1", port) as client:
        await client.write_event(Describe().event())
        while True:
            event = await asyncio.wait_for(client.read_event(), 10)
            assert event is not None
            if Info.is_type(event.type):
                return Info.from_event(event)


async def test_describe_lists_the_configured_models(whisper: WhisperEngine) -> None:
    """Through the planned chain (registry + plan_chain), not injected engines."""
    settings = make_settings(**{"asr.chain": [{"model": "whisper-base", "device": "cpu"}]})
    service = AsrService(make_context(settings))
    assert [e.name for e in service.chain.engines] == ["faster-whisper:whisper-base@cpu"]
    server = ServiceServer(service)
    await server.start()  # describe needs no model: not even started
    try:
        info = await describe(server.port or 0)
    finally:
        await server.stop(1.0)
    program = info.asr[0]
    assert program.supports_transcript_streaming is True
    assert program.requires_external_vad is True
    (model,) = program.models
    assert model.name == "whisper-base" and model.installed
    assert "fr" in model.languages and model.version and model.attribution.url


async def test_describe_answers_while_a_decode_is_running(speech: Callable[..., np.ndarray]) -> None:
    gated = GatedEngine()
    async with running([gated], endpointing_s=0.6) as (_, server):
        port = server.port or 0
        pending = asyncio.create_task(transcribe(port, pcm_bytes(padded(speech("Ouvre la porte.")))))
        await asyncio.wait_for(gated.entered.wait(), 30)
        info = await asyncio.wait_for(describe(port), 5)
        assert info.asr[0].requires_external_vad is False  # endpointing on
        gated.gate.set()
        exchange = await pending
    assert exchange.text == "ouvert"


async def test_events_in_protocol_order(
    shared: Callable[[], list[AsrEngine]], speech: Callable[..., np.ndarray]
) -> None:
    async with running(shared()) as (_, server):
        exchange = await transcribe(server.port or 0, pcm_bytes(padded(speech(FRENCH[0]), after_s=0.8)))
    types = exchange.types
    assert types[0] == "voice-started"
    assert types.index("voice-stopped") < types.index("transcript-start") < types.index("transcript")
    assert types[-2:] == ["transcript", "transcript-stop"]
    chunks = "".join(e.data["text"] for e in exchange.events if e.type == "transcript-chunk")
    assert chunks == exchange.text
    transcript = next(e for e in exchange.events if e.type == "transcript")
    assert transcript.data["language"] == "fr"


async def test_audio_stop_without_audio_and_without_transcribe(shared: Callable[[], list[AsrEngine]]) -> None:
    async with running(shared()) as (service, server):
        exchange = await transcribe(server.port or 0, b"", send_transcribe=False)
        assert service.decodes == 0
    assert exchange.text == ""
    assert exchange.types[-1] == "transcript-stop"


# --- accuracy -------------------------------------------------------------------------------


async def test_french_word_error_rate(
    shared: Callable[[], list[AsrEngine]], speech: Callable[..., np.ndarray]
) -> None:
    async with running(shared()) as (_, server):
        exchanges = [
            await transcribe(server.port or 0, pcm_bytes(padded(speech(text))), language="fr")
            for text in FRENCH
        ]
    texts = [e.text for e in exchanges]
    assert wer(FRENCH, texts) <= FRENCH_MAX_WER, texts


async def test_english_word_error_rate(
    shared: Callable[[], list[AsrEngine]], speech: Callable[..., np.ndarray]
) -> None:
    async with running(shared()) as (_, server):
        exchanges = [
            await transcribe(server.port or 0, pcm_bytes(padded(speech(text, "en"))), language="en")
            for text in ENGLISH
        ]
    texts = [e.text for e in exchanges]
    assert wer(ENGLISH, texts) <= ENGLISH_MAX_WER, texts


@pytest.mark.parametrize("kind", ["silence", "pink-noise"])
async def test_silence_and_noise_give_an_empty_transcript(
    shared: Callable[[], list[AsrEngine]], kind: str
) -> None:
    audio = np.zeros(5 * RATE, np.int16) if kind == "silence" else pink_noise(5.0)
    async with running(shared()) as (service, server):
        exchange = await transcribe(server.port or 0, pcm_bytes(audio))
        decodes = service.decodes
    assert exchange.text == ""
    assert decodes == 0  # gated by the VAD: Whisper never saw the noise


async def test_hints_bring_a_rare_name(
    shared: Callable[[], list[AsrEngine]], speech: Callable[..., np.ndarray]
) -> None:
    # Without the hint whisper-base hears "y'a un peu de camp again"; with it, "Kerguelen".
    audio = pcm_bytes(padded(speech("Allume la lumière de Kerguelen.")))
    async with running(shared()) as (_, server):
        plain = await transcribe(server.port or 0, audio)
        hinted = await transcribe(server.port or 0, audio, names=["Kerguelen"])
    assert "kerguelen" not in normalize(plain.text or "")
    assert "kerguelen" in normalize(hinted.text or "")


# --- speed design: speculation and endpointing ------------------------------------------------


async def test_speculative_decode_is_reused_after_the_pause(
    shared: Callable[[], list[AsrEngine]], speech: Callable[..., np.ndarray]
) -> None:
    """Real-time stream: speech, 1.5 s of silence, audio-stop → one decode, started in the pause."""
    audio = pcm_bytes(padded(trimmed(speech(ENGLISH[0], "en")), after_s=1.5))
    async with running(shared()) as (service, server):
        exchange = await transcribe(server.port or 0, audio, language="en", pace=1.0)
        assert service.decodes == 1
        assert service.speculative_hits == 1
    assert "kitchen" in normalize(exchange.text or "")
    # The partial text went out while audio was still arriving, before the final transcript.
    assert exchange.types.index("transcript-chunk") < exchange.types.index("transcript")


async def test_speech_after_the_pause_invalidates_the_speculation(
    shared: Callable[[], list[AsrEngine]], speech: Callable[..., np.ndarray]
) -> None:
    first = trimmed(speech("Turn on the kitchen lights.", "en"))
    second = trimmed(speech("And close the garage door.", "en"))
    gap = np.zeros(int(0.9 * RATE), np.int16)
    audio = pcm_bytes(np.concatenate([np.zeros(int(0.3 * RATE), np.int16), first, gap, second]))
    async with running(shared()) as (service, server):
        exchange = await transcribe(server.port or 0, audio, language="en", pace=1.0)
        assert service.speculative_misses == 1
        assert service.speculative_hits == 0
        assert service.decodes == 2  # the dropped guess, then the whole utterance
    text = normalize(exchange.text or "")
    assert "kitchen" in text and "garage" in text


async def test_endpointing_answers_before_audio_stop(
    shared: Callable[[], list[AsrEngine]], speech: Callable[..., np.ndarray]
) -> None:
    audio = pcm_bytes(padded(speech(ENGLISH[3], "en"), after_s=2.0))
    async with running(shared(), endpointing_s=0.8) as (service, server):
        exchange = await transcribe(
            server.port or 0, audio, language="en", send_stop=False, final=("transcript-stop", "error")
        )
        assert service.speculative_hits == 1  # the 0.3 s guess became the answer at 0.8 s
    assert "garage" in normalize(exchange.text or "")
    assert exchange.types.count("transcript") == 1


# --- robustness -------------------------------------------------------------------------------


async def test_over_long_audio_is_refused(
    shared: Callable[[], list[AsrEngine]], speech: Callable[..., np.ndarray]
) -> None:
    audio = pcm_bytes(np.tile(padded(speech(FRENCH[1])), 3))
    async with running(shared(), max_seconds=5.0) as (_, server):
        exchange = await transcribe(server.port or 0, audio)
        # ...and the server keeps serving.
        after = await transcribe(server.port or 0, pcm_bytes(padded(speech(FRENCH[4]))))
    assert exchange.error is not None and exchange.error.code == "audio-too-long"
    assert exchange.text is None
    assert "capitale" in normalize(after.text or "")


async def test_endpointing_with_no_speech_ends_in_an_empty_transcript(
    shared: Callable[[], list[AsrEngine]], speech: Callable[..., np.ndarray]
) -> None:
    """With server-side endpointing the client never sends ``audio-stop``: a stream in which
    nobody speaks for ``asr.max_seconds`` is silence (empty transcript), not an error."""
    silence = pcm_bytes(np.zeros(int(7.0 * RATE), np.int16))
    async with running(shared(), endpointing_s=0.8, max_seconds=5.0) as (service, server):
        exchange = await transcribe(
            server.port or 0, silence, send_stop=False, final=("transcript-stop", "error")
        )
        assert service.decodes == 0  # nothing heard, nothing decoded
        # ...and the same server still hears the next speaker.
        after = await transcribe(
            server.port or 0, pcm_bytes(padded(speech(FRENCH[4]), after_s=1.5)), send_stop=False,
            final=("transcript-stop", "error"),
        )  # fmt: skip
    assert exchange.error is None and exchange.text == ""
    assert exchange.types.count("transcript") == 1
    assert "capitale" in normalize(after.text or "")


@pytest.mark.parametrize(("rate", "width", "channels"), [(8000, 2, 2), (16000, 3, 1), (48000, 4, 2)])
async def test_any_input_format(
    shared: Callable[[], list[AsrEngine]],
    speech: Callable[..., np.ndarray],
    rate: int,
    width: int,
    channels: int,
) -> None:
    mono = padded(speech(ENGLISH[0], "en", rate), before_s=0.3, after_s=0.6)
    if rate != RATE:  # padding is in 16 kHz samples: recompute at this rate
        mono = np.concatenate(
            [np.zeros(rate // 3, np.int16), speech(ENGLISH[0], "en", rate), np.zeros(rate // 2, np.int16)]
        )
    interleaved = np.repeat(mono, channels) if channels > 1 else mono
    async with running(shared()) as (_, server):
        exchange = await transcribe(
            server.port or 0,
            pcm_bytes(interleaved, width),
            rate=rate,
            width=width,
            channels=channels,
            language="en",
        )
    assert wer([ENGLISH[0]], [exchange.text]) <= ENGLISH_MAX_WER, exchange.text


async def test_four_concurrent_clients(
    shared: Callable[[], list[AsrEngine]], speech: Callable[..., np.ndarray]
) -> None:
    async with running(shared()) as (_, server):
        exchanges = await asyncio.gather(
            *[
                transcribe(server.port or 0, pcm_bytes(padded(speech(text, "en"))), language="en")
                for text in ENGLISH
            ]
        )
    texts = [e.text for e in exchanges]
    assert wer(ENGLISH, texts) <= ENGLISH_MAX_WER, texts  # nobody got someone else's words


async def test_busy_when_the_queue_is_full(speech: Callable[..., np.ndarray]) -> None:
    gated = GatedEngine()
    audio = pcm_bytes(padded(speech("Ouvre la porte.")))
    async with running([gated], queue_size=0, speculative_pause_s=0.0) as (_, server):
        first = asyncio.create_task(transcribe(server.port or 0, audio))
        await asyncio.wait_for(gated.entered.wait(), 30)
        second = await transcribe(server.port or 0, audio)
        gated.gate.set()
        answered = await first
    assert second.error is not None and second.error.code == "busy"
    assert answered.text == "ouvert"


async def test_waiting_behind_other_decodes_past_the_timeout_is_busy_not_a_broken_engine(
    whisper: WhisperEngine, speech: Callable[..., np.ndarray]
) -> None:
    """Under the recorded load, queueing for the model timed out and opened the circuit."""
    audio = pcm_bytes(padded(speech(FRENCH[4])))
    # The timeout leaves a real decode ample time (a cold one took over 0.5 s in CI).
    settings = {"timeout_s": 5.0, "failure_threshold": 1, "speculative_pause_s": 0.0}
    async with running([SharedEngine(whisper)], **settings) as (service, server):
        async with whisper._lock:  # another decode holds the model
            refused = await transcribe(server.port or 0, audio)
        busy = service.context.metrics.requests.labels("asr", "busy")._value.get()
        circuit = service.chain.status()[0]["circuit"]
        answered = await transcribe(server.port or 0, audio)
    assert refused.error is not None and refused.error.code == "busy", refused.types
    assert "queued" in refused.error.text
    assert (busy, circuit) == (1, "closed")  # before: transcription-failed, and the circuit open
    assert "capitale" in normalize(answered.text or ""), answered.types


async def test_an_answer_is_counted_when_the_client_leaves_right_after_the_transcript(
    speech: Callable[..., np.ndarray],
) -> None:
    gated = GatedEngine()
    gated.gate.set()
    audio = pcm_bytes(padded(speech("Ouvre la porte.")))
    service = AsrService(make_context(make_settings(**{"asr.speculative_pause_s": 0.0})), engines=[gated])
    await service.start()
    try:
        client = HangsUpAfter("transcript")
        handler = service.create_handler(client)  # type: ignore[arg-type]
        start = AudioStart(RATE, 2, 1).event()
        chunks = [AudioChunk(RATE, 2, 1, audio[i : i + 3200]).event() for i in range(0, len(audio), 3200)]
        for event in [Transcribe(language="fr").event(), start, *chunks, AudioStop().event()]:
            await handler.handle_event(event)
        await handler.disconnect()
        requests = service.context.metrics.requests
        assert [e.type for e in client.events][-1] == "transcript"
        assert requests.labels("asr", "ok")._value.get() == 1  # the bench's server count missed these
    finally:
        await service.stop()


async def test_vad_runs_off_the_event_loop(
    speech: Callable[..., np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Silero on the loop starved every other connection and /metrics under load (recorded traffic)."""
    threads: list[int] = []
    real_frame = VadStream._frame

    def spied_frame(stream: VadStream, frame: np.ndarray) -> float:
        threads.append(threading.get_ident())
        return real_frame(stream, frame)

    monkeypatch.setattr(VadStream, "_frame", spied_frame)
    gated = GatedEngine()
    gated.gate.set()
    audio = pcm_bytes(padded(speech("Ouvre la porte.")))
    in_process = {"server.engine_workers": False}
    async with running([gated], speculative_pause_s=0.0, **in_process) as (service, server):
        assert service.vad.worker is None
        exchange = await transcribe(server.port or 0, audio)  # 20 ms chunks: frames span chunks
    assert exchange.text == "ouvert"
    assert "voice-started" in exchange.types  # the VAD saw the speech
    assert len(threads) == len(audio) // 2 // 512
    assert threading.get_ident() not in threads


async def test_vad_in_its_worker_process_survives_a_kill(speech: Callable[..., np.ndarray]) -> None:
    """``asr.vad_in_worker``: Silero in a supervised worker; the stream's state stays here."""
    gated = GatedEngine()
    gated.gate.set()
    audio = pcm_bytes(padded(speech("Ouvre la porte.")))
    async with running([gated], speculative_pause_s=0.0, vad_in_worker=True) as (service, server):
        assert service.vad.worker is not None
        status = service.vad.worker_status()
        assert status is not None and status["state"] == "ready" and status["pid"] != os.getpid()
        exchange = await transcribe(server.port or 0, audio)
        assert "voice-started" in exchange.types and exchange.text == "ouvert"
        # A crashed VAD worker restarts and the next stream is served as before.
        os.kill(status["pid"], signal.SIGKILL)
        again = await transcribe(server.port or 0, audio)
        assert "voice-started" in again.types and again.text == "ouvert"
        assert service.context.metrics.engine_crashes.labels("asr", "vad", "SIGKILL")._value.get() == 1


async def test_disconnect_mid_stream_frees_everything(
    shared: Callable[[], list[AsrEngine]], speech: Callable[..., np.ndarray]
) -> None:
    audio = pcm_bytes(padded(speech(FRENCH[5]), after_s=0.5))
    async with running(shared()) as (service, server):
        port = server.port or 0
        exchange = Exchange()
        with contextlib.suppress(TimeoutError):
            # Stream in real time until the speculative decode has started, then vanish.
            await transcribe(port, audio, pace=1.0, send_stop=False, final=("voice-stopped",))
        for _ in range(600):  # the dropped decode ends (cancelled or finished), nothing waits
            if service._pending == 0 and server.active == 0:
                break
            await asyncio.sleep(0.05)
        assert service._pending == 0 and server.active == 0
        exchange = await transcribe(port, pcm_bytes(padded(speech(FRENCH[4]))))
    assert "capitale" in normalize(exchange.text or "")


async def test_remote_wyoming_level_answers_when_the_local_one_is_broken(
    shared: Callable[[], list[AsrEngine]], speech: Callable[..., np.ndarray]
) -> None:
    async with running(shared()) as (remote_service, remote_server):
        remote = RemoteWyomingEngine(f"tcp://127.0.0.1:{remote_server.port}")
        async with running([BrokenEngine(), remote]) as (service, server):
            exchange = await transcribe(server.port or 0, pcm_bytes(padded(speech(FRENCH[4]))))
            status = service.chain.status()
        assert remote_service.decodes == 1  # the remote did the work
    assert "capitale" in normalize(exchange.text or "")
    assert status[0]["failures"] >= 1 and status[1]["served"] >= 1


async def test_smoke_judges_the_words_it_heard(shared: Callable[[], list[AsrEngine]]) -> None:
    async with running(shared()) as (service, _):
        text = await service.smoke()
    assert "heard" in text and "WER" in text
    assert float(text.split("WER ")[1].split(" ")[0]) <= 0.5


async def test_smoke_fails_on_a_transcript_that_is_wrong() -> None:
    """An engine that answers with the wrong words fails the smoke (it used to say ok)."""
    wrong = GatedEngine()  # always hears "ouvert"
    wrong.gate.set()
    async with running([wrong]) as (service, _):
        with pytest.raises(EngineError, match=r"WER 1\.00 > 0\.5"):
            await service.smoke()


class GarbageEngine:
    """Answers with a repetition loop, as a broken or overloaded level would."""

    name = "garbage"
    device = "cpu"
    quality = 9
    model_name = "garbage"
    languages: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.calls = 0

    async def load(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def transcribe(self, request: AsrRequest, cancel: threading.Event | None = None) -> AsrResult:
        self.calls += 1
        return AsrResult(
            "la la la la la la", request.language, self.name, avg_logprob=-0.2, compression_ratio=3.1
        )


async def test_quality_gate_sends_garbage_to_the_next_level(
    shared: Callable[[], list[AsrEngine]], speech: Callable[..., np.ndarray]
) -> None:
    garbage = GarbageEngine()
    async with running([garbage, *shared()], speculative_pause_s=0.0) as (service, server):
        exchange = await transcribe(server.port or 0, pcm_bytes(padded(speech(FRENCH[4]))))
        status = service.chain.status()
    assert garbage.calls == 1
    assert "capitale" in normalize(exchange.text or "")
    assert status[0]["last_error"].startswith("rejected") and status[1]["served"] == 1


async def test_transcribe_name_picks_the_level(
    shared: Callable[[], list[AsrEngine]], speech: Callable[..., np.ndarray]
) -> None:
    garbage = GarbageEngine()
    async with running([garbage, *shared()], speculative_pause_s=0.0) as (service, server):
        assert service.model_levels("whisper-base") == [1]
        assert service.model_levels("unknown") is None
        audio = pcm_bytes(padded(speech(FRENCH[4])))
        async with AsyncTcpClient("127.0.0.1", server.port or 0) as client:
            await client.write_event(Transcribe(language="fr", name="whisper-base").event())
            await client.write_event(AudioStart(rate=RATE, width=2, channels=1).event())
            await client.write_event(AudioChunk(rate=RATE, width=2, channels=1, audio=audio).event())
            await client.write_event(AudioStop().event())
            text = None
            while text is None:
                event = await asyncio.wait_for(client.read_event(), 60)
                assert event is not None
                if Transcript.is_type(event.type):
                    text = Transcript.from_event(event).text
    assert garbage.calls == 0  # the named model answered first
    assert "capitale" in normalize(text)


class CountsWindows(WhisperEngine):
    """whisper-base that records each decode's encoder window, and may loop on short ones.

    Whether a 6 s window really makes whisper-base loop depends on the machine's kernels
    (it did here on 2026-11-30, not on CI's machine on 2026-12-04), so the loop is made
    certain when asked: the model still decodes for real, and the short-window text is
    doubled the way Whisper loops.
    """

    def __init__(self, *args: Any, loops: bool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.loops = loops
        self.frames_decoded: list[int] = []

    def _decode(self, model: Any, request: AsrRequest, cancel: threading.Event | None) -> AsrResult:
        self.frames_decoded.append(self._encoder_frames)
        result = super()._decode(model, request, cancel)
        if self.loops and self._encoder_frames < FULL_WINDOW_FRAMES:
            return replace(result, text=f"{result.text} {result.text}")
        return result


@pytest.mark.parametrize("loops", [True, False], ids=["made-to-loop", "as-this-cpu-reads-it"])
async def test_a_loop_from_a_too_short_encoder_window_is_decoded_again(
    whisper: WhisperEngine, speech: Callable[..., np.ndarray], loops: bool
) -> None:
    """Said twice by the short window: decoded again with Whisper's 30 s; one reading comes out."""
    engine = CountsWindows(
        whisper.model_dir,
        model_name="whisper-base",
        options={"encoder_window_s": 6.0},
        languages=("fr",),
        loops=loops,
    )
    await engine.load()
    audio = padded(speech(FRENCH[0]), before_s=0.3, after_s=0.2).astype(np.float32) / 32768
    result = await engine.transcribe(AsrRequest(audio, "fr"))
    await engine.close()
    assert engine.frames_decoded[0] == 600  # the short window was tried first
    if loops:
        assert engine.frames_decoded == [600, FULL_WINDOW_FRAMES]
        assert engine.window_retries == 1
    # Whatever the real 6 s window read here (once, twice, three times: it varies with the
    # CPU's kernels), one reading of the command comes out, within the French bound. The
    # exact words of espeak-ng's robotic French vary between machines and builds (on
    # 2026-12-01 a fresh install read "bonjour" as "pour vous").
    assert engine.window_retries == len(engine.frames_decoded) - 1
    assert wer([FRENCH[0]], [result.text]) <= FRENCH_MAX_WER, result.text
    assert len(words(result.text)) <= len(words(FRENCH[0])) + 2, result.text


THREADS_OF_A_DECODE = """
import asyncio, json, os, sys
import numpy as np
from wyoming_superwhisper.asr.engines import WhisperEngine

def threads():
    return len(os.listdir("/proc/self/task"))

async def main():
    engine = WhisperEngine(sys.argv[1], model_name="whisper-base", options=json.loads(sys.argv[2]))
    before = threads()
    engine._model = engine._load()  # on this thread: no executor thread counted
    audio = np.load(sys.argv[3])
    segments, _ = engine._model.transcribe(audio, language="fr", beam_size=2, without_timestamps=True)
    text = " ".join(segment.text for segment in segments)
    print(json.dumps({"started": threads() - before, "text": text, "cpu_threads": engine.cpu_threads}))

asyncio.run(main())
"""


@requires_espeak
async def test_a_cpu_level_decodes_on_one_thread_unless_told(
    whisper: WhisperEngine, speech: Callable[..., np.ndarray], tmp_path: Any
) -> None:
    """One CTranslate2 thread by default on the CPU (short commands decode faster so, and the
    other cores stay with the VAD and the voice); ``cpu_threads`` still gives more. Counted as
    the OS threads a fresh process starts to load the model and decode once: a team of two
    threads starts more than the default."""
    audio = padded(speech(FRENCH[0]), before_s=0.3, after_s=0.2).astype(np.float32) / 32768
    np.save(tmp_path / "command.npy", audio)

    def run(options: dict[str, Any]) -> dict[str, Any]:
        argv = [str(whisper.model_dir), json.dumps(options), str(tmp_path / "command.npy")]
        done = subprocess.run(
            [sys.executable, "-c", THREADS_OF_A_DECODE, *argv], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    default, two = run({}), run({"cpu_threads": 2})
    assert (default["cpu_threads"], two["cpu_threads"]) == (1, 2)
    assert two["started"] > default["started"], (default, two)
    assert default["text"].strip() and two["text"].strip()


async def test_cpu_threads_on_a_gpu_level_and_bad_values_are_left_to_ctranslate2(tmp_path: Any) -> None:
    assert WhisperEngine(tmp_path, model_name="m", device="cuda:0").cpu_threads == 0
    assert WhisperEngine(tmp_path, model_name="m", options={"cpu_threads": 4}).cpu_threads == 4
    for bad in (-1, "two", True):
        assert WhisperEngine(tmp_path, model_name="m", options={"cpu_threads": bad}).cpu_threads == 1


class SaysNumbers(GatedEngine):
    """Whisper's way of writing a temperature command, straight from the chain."""

    async def transcribe(self, request: AsrRequest, cancel: threading.Event | None = None) -> AsrResult:
        return AsrResult(text="Règle le chauffage sur 20 et 1 degrés.", language="fr", engine=self.name)


@pytest.mark.parametrize(("numbers", "expected"), [("digits", "21 degrés"), ("words", "20 et 1 degrés")])
async def test_partial_and_final_transcripts_carry_the_same_digits(
    speech: Callable[..., np.ndarray], numbers: str, expected: str
) -> None:
    audio = pcm_bytes(padded(speech("Ouvre la porte."), after_s=0.8))
    async with running([SaysNumbers()], numbers=numbers) as (_, server):
        exchange = await transcribe(server.port or 0, audio)
    assert exchange.text == f"Règle le chauffage sur {expected}."
    chunks = "".join(e.data["text"] for e in exchange.events if e.type == "transcript-chunk")
    assert chunks.strip() == exchange.text  # the streamed pieces are the same digits
