"""The pipeline client (``superwhisper pipeline``) against Wyoming servers over real sockets.

Two heights:

* small scripted Wyoming servers written here (they record what the client
  sent), to pin down the protocol the client speaks: audio format and pacing,
  transcript streaming, early endpointing, handled streaming forwarded into
  streaming synthesis, the ``synthesize`` fallback, error events;
* the project's own three servers with real models, fed a French sentence
  spoken by espeak-ng: the answer comes back as audio.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import wave
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from wyoming.asr import Transcript, TranscriptChunk, TranscriptStart, TranscriptStop
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.error import Error
from wyoming.event import Event, async_read_event, async_write_event
from wyoming.handle import Handled, HandledChunk, HandledStart, HandledStop
from wyoming.info import Attribution, Info, TtsProgram, TtsVoice

from tests.conftest import make_context, make_settings, requires_espeak, serving
from wyoming_superwhisper.cli import SERVICES
from wyoming_superwhisper.pipeline import (
    PipelineError,
    PipelineTimings,
    add_arguments,
    main,
    read_wav_16k,
    run_pipeline,
    to_pcm16_mono,
    write_wav,
)
from wyoming_superwhisper.runtime.server import ServiceContext, WyomingService

ATTRIBUTION = Attribution(name="test", url="https://example.invalid")

Script = Callable[["FakeServer", asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class FakeServer:
    """A scripted Wyoming server on an OS-chosen loopback port that records every event it read."""

    script: Script
    received: list[Event] = field(default_factory=list)
    connections: int = 0
    server: asyncio.Server | None = None

    @property
    def uri(self) -> str:
        assert self.server is not None
        return f"tcp://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def read(self, reader: asyncio.StreamReader) -> Event | None:
        event = await async_read_event(reader)
        if event is not None:
            self.received.append(event)
        return event

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.script(self, reader, writer)
        except ConnectionError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def of_type(self, event_type: str) -> list[Event]:
        return [e for e in self.received if e.type == event_type]


@contextlib.asynccontextmanager
async def fake(script: Script) -> AsyncIterator[FakeServer]:
    server = FakeServer(script)
    server.server = await asyncio.start_server(server._on_connection, "127.0.0.1", 0)
    try:
        yield server
    finally:
        server.server.close()
        await server.server.wait_closed()


# --- scripts -----------------------------------------------------------------------------------

FR_TRANSCRIPT = "Quelle heure est-il ?"
FR_ANSWER = ["Il est ", "midi. ", "Bonne journée !"]


def asr_script(*, streaming: bool = True, endpoint_after_chunks: int | None = None) -> Script:
    async def run(self: FakeServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        chunks = 0
        while (event := await self.read(reader)) is not None:
            if AudioChunk.is_type(event.type):
                chunks += 1
                if endpoint_after_chunks is not None and chunks == endpoint_after_chunks:
                    break
            if AudioStop.is_type(event.type):
                break
        if streaming:
            await async_write_event(TranscriptStart(language="fr").event(), writer)
            for piece in ("Quelle heure", " est-il ?"):
                await async_write_event(TranscriptChunk(text=piece).event(), writer)
        await async_write_event(Transcript(text=FR_TRANSCRIPT, language="fr").event(), writer)
        if streaming:
            await async_write_event(TranscriptStop().event(), writer)
        # keep reading what the client still sends (audio after an endpoint) until it leaves
        while await self.read(reader) is not None:
            pass

    return run


def handle_script(*, streaming: bool = True, error: bool = False) -> Script:
    async def run(self: FakeServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        event = await self.read(reader)
        assert event is not None and Transcript.is_type(event.type)
        if error:
            await async_write_event(
                Error(text="modèle indisponible", code="all-levels-failed").event(), writer
            )
            return
        if streaming:
            await async_write_event(HandledStart().event(), writer)
            for piece in FR_ANSWER:
                await async_write_event(HandledChunk(text=piece).event(), writer)
                await asyncio.sleep(0.01)
            await async_write_event(HandledStop().event(), writer)
        else:
            await async_write_event(Handled(text="".join(FR_ANSWER)).event(), writer)

    return run


TTS_RATE = 22050


def tone(samples: int) -> bytes:
    return (np.sin(np.arange(samples) / 10.0) * 8000).astype("<i2").tobytes()


def tts_script(*, streaming: bool) -> Script:
    """Describe → info; a stream answers each chunk with 0.1 s of audio (segments, like wyoming-piper)."""

    async def run(self: FakeServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (event := await self.read(reader)) is not None:
            if event.type == "describe":
                voice = TtsVoice(
                    name="fr-test",
                    description="",
                    attribution=ATTRIBUTION,
                    installed=True,
                    version="1",
                    languages=["fr"],
                )
                program = TtsProgram(
                    name="fake-tts",
                    description="",
                    attribution=ATTRIBUTION,
                    installed=True,
                    version="1",
                    voices=[voice],
                    supports_synthesize_streaming=streaming,
                )
                await async_write_event(Info(tts=[program]).event(), writer)
                return
            if event.type == "synthesize-chunk":
                await async_write_event(AudioStart(TTS_RATE, 2, 1).event(), writer)
                await async_write_event(AudioChunk(TTS_RATE, 2, 1, tone(TTS_RATE // 10)).event(), writer)
                await async_write_event(AudioStop().event(), writer)
            if event.type == "synthesize-stop":
                await async_write_event(Event(type="synthesize-stopped"), writer)
                return
            if event.type == "synthesize":
                await async_write_event(AudioStart(TTS_RATE, 2, 1).event(), writer)
                for _ in range(3):
                    await async_write_event(AudioChunk(TTS_RATE, 2, 1, tone(TTS_RATE // 10)).event(), writer)
                await async_write_event(AudioStop().event(), writer)
                return

    return run


@pytest.fixture
def stereo_wav(tmp_path: Path) -> Path:
    """0.5 s of stereo 22.05 kHz audio: the client must send 16 kHz mono."""
    path = tmp_path / "in.wav"
    mono = (np.sin(np.arange(int(0.5 * 22050)) / 7.0) * 10000).astype("<i2")
    stereo = np.stack([mono, mono], axis=1).reshape(-1)
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(2)
        wav.setsampwidth(2)
        wav.setframerate(22050)
        wav.writeframes(stereo.tobytes())
    return path


# --- audio conversion ----------------------------------------------------------------------------


def test_conversion_to_16k_mono() -> None:
    mono = (np.sin(np.arange(44100) / 20.0) * 12000).astype("<i2")
    stereo = np.stack([mono, mono], axis=1).reshape(-1).tobytes()
    out = np.frombuffer(to_pcm16_mono(stereo, 44100, 2, 2, 16000), dtype="<i2")
    assert abs(len(out) - 16000) <= 1
    assert 11000 < np.abs(out).max() <= 12100  # same loudness, both channels averaged
    u8 = (np.frombuffer(mono.tobytes(), dtype="<i2") // 256 + 128).astype(np.uint8).tobytes()
    out8 = np.frombuffer(to_pcm16_mono(u8, 16000, 1, 1, 16000), dtype="<i2")
    assert len(out8) == 44100 and 11000 < np.abs(out8).max() < 12300
    with pytest.raises(ValueError):
        to_pcm16_mono(b"\0" * 10, 16000, 5, 1, 16000)


def test_read_wav_round_trip(tmp_path: Path) -> None:
    pcm = tone(16000)
    write_wav(tmp_path / "x.wav", pcm, 16000)
    assert read_wav_16k(tmp_path / "x.wav") == pcm


# --- protocol against scripted servers ---------------------------------------------------------------


async def test_streaming_pipeline_forwards_answer_chunks_into_streaming_tts(
    stereo_wav: Path, tmp_path: Path
) -> None:
    out = tmp_path / "answer.wav"
    async with (
        fake(asr_script()) as asr,
        fake(handle_script()) as handle,
        fake(tts_script(streaming=True)) as tts,
    ):
        timings = await run_pipeline(stereo_wav, out, asr.uri, handle.uri, tts.uri, realtime=False)
    # Audio is read while the answer is still being written (first audio before the answer ends).
    assert timings.first_audio is not None and timings.answer_done is not None
    assert timings.first_audio < timings.answer_done

    # ASR got transcribe(fr), 16 kHz mono s16 in 20 ms chunks, then audio-stop
    assert asr.received[0].type == "transcribe" and asr.received[0].data.get("language") == "fr"
    start = AudioStart.from_event(asr.of_type("audio-start")[0])
    assert (start.rate, start.width, start.channels) == (16000, 2, 1)
    chunks = [AudioChunk.from_event(e) for e in asr.of_type("audio-chunk")]
    assert all((c.rate, c.width, c.channels) == (16000, 2, 1) for c in chunks)
    assert {len(c.audio) for c in chunks[:-1]} == {640}
    assert sum(len(c.audio) for c in chunks) == pytest.approx(16000, abs=4)  # 0.5 s
    assert asr.received[-1].type == "audio-stop"

    # handle got the final transcript text
    assert [Transcript.from_event(e).text for e in handle.of_type("transcript")] == [FR_TRANSCRIPT]

    # TTS got the answer as it was written, chunk by chunk, in order
    assert [e.type for e in tts.received if e.type != "describe"] == [
        "synthesize-start",
        "synthesize-chunk",
        "synthesize-chunk",
        "synthesize-chunk",
        "synthesize-stop",
    ]
    assert [e.data["text"] for e in tts.of_type("synthesize-chunk")] == FR_ANSWER

    assert timings.transcript_text == FR_TRANSCRIPT
    assert timings.asr_streamed and timings.tts_streaming and timings.handled
    assert timings.answer_text == "Il est midi. Bonne journée !"
    assert timings.answer_chunks == 3
    with wave.open(str(out)) as wav:
        assert wav.getframerate() == TTS_RATE and wav.getnchannels() == 1
        assert wav.getnframes() == 3 * TTS_RATE // 10  # three segments of 0.1 s
    assert timings.output_seconds == pytest.approx(0.3)
    assert_ordered(timings)


def assert_ordered(timings: PipelineTimings) -> None:
    marks = [
        timings.speech_end,
        timings.transcript,
        timings.first_answer_chunk,
        timings.first_audio,
        timings.done,
    ]
    assert all(m is not None for m in marks), marks
    assert marks == sorted(marks)  # type: ignore[type-var]
    stages = timings.stages()
    assert all(v is not None and v >= 0 for v in stages.values()), stages


async def test_tts_without_streaming_gets_one_synthesize(stereo_wav: Path, tmp_path: Path) -> None:
    out = tmp_path / "answer.wav"
    async with (
        fake(asr_script(streaming=False)) as asr,
        fake(handle_script()) as handle,
        fake(tts_script(streaming=False)) as tts,
    ):
        timings = await run_pipeline(stereo_wav, out, asr.uri, handle.uri, tts.uri, realtime=False)
    assert [e.type for e in tts.received if e.type != "describe"] == ["synthesize"]
    assert tts.of_type("synthesize")[0].data["text"] == "Il est midi. Bonne journée !"
    assert not timings.tts_streaming and not timings.asr_streamed
    with wave.open(str(out)) as wav:
        assert wav.getnframes() == 3 * TTS_RATE // 10
    assert_ordered(timings)


async def test_non_streaming_handle_answer_is_spoken(stereo_wav: Path, tmp_path: Path) -> None:
    async with (
        fake(asr_script()) as asr,
        fake(handle_script(streaming=False)) as handle,
        fake(tts_script(streaming=True)) as tts,
    ):
        timings = await run_pipeline(
            stereo_wav, tmp_path / "a.wav", asr.uri, handle.uri, tts.uri, realtime=False
        )
    assert [e.data["text"] for e in tts.of_type("synthesize-chunk")] == ["Il est midi. Bonne journée !"]
    assert timings.answer_chunks == 1


async def test_server_endpointing_stops_the_audio_early(tmp_path: Path) -> None:
    wav = tmp_path / "long.wav"
    write_wav(wav, tone(16000 * 3), 16000)  # 3 s; the server ends the utterance after 10 chunks
    async with (
        fake(asr_script(endpoint_after_chunks=10)) as asr,
        fake(handle_script()) as handle,
        fake(tts_script(streaming=True)) as tts,
    ):
        timings = await run_pipeline(wav, tmp_path / "a.wav", asr.uri, handle.uri, tts.uri, realtime=True)
    sent = len(asr.of_type("audio-chunk"))
    assert 10 <= sent < 150  # 150 chunks of 20 ms would be the whole file
    assert timings.transcript_text == FR_TRANSCRIPT
    assert_ordered(timings)


async def test_handle_error_names_the_stage(stereo_wav: Path, tmp_path: Path) -> None:
    async with (
        fake(asr_script()) as asr,
        fake(handle_script(error=True)) as handle,
        fake(tts_script(streaming=True)) as tts,
    ):
        with pytest.raises(PipelineError) as caught:
            await run_pipeline(stereo_wav, tmp_path / "a.wav", asr.uri, handle.uri, tts.uri, realtime=False)
    assert caught.value.stage == "handle"
    assert caught.value.code == "all-levels-failed"
    assert not (tmp_path / "a.wav").exists()


async def test_unreachable_server_is_a_pipeline_error(stereo_wav: Path, tmp_path: Path) -> None:
    async with fake(tts_script(streaming=True)) as tts:
        with pytest.raises(PipelineError) as caught:
            await run_pipeline(
                stereo_wav, tmp_path / "a.wav", "tcp://127.0.0.1:9", tts.uri, tts.uri, realtime=False
            )
    assert caught.value.stage == "asr" and caught.value.code == "connect"


async def test_realtime_pacing_spreads_the_audio(tmp_path: Path) -> None:
    """Real-time mode takes at least the audio's length to send (a lower bound, not a timing race)."""
    wav = tmp_path / "one.wav"
    write_wav(wav, tone(16000), 16000)  # 1 s
    async with (
        fake(asr_script()) as asr,
        fake(handle_script()) as handle,
        fake(tts_script(streaming=True)) as tts,
    ):
        timings = await run_pipeline(wav, tmp_path / "a.wav", asr.uri, handle.uri, tts.uri, realtime=True)
    assert timings.speech_end is not None and timings.speech_end >= 0.95


def test_cli_prints_json_timings(
    stereo_wav: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async def serve_and_run() -> tuple[int, list[Any]]:
        async with (
            fake(asr_script()) as asr,
            fake(handle_script()) as handle,
            fake(tts_script(streaming=True)) as tts,
        ):
            argv = ["--wav", str(stereo_wav), "--out", str(tmp_path / "o.wav"), "--fast", "--json"]
            argv += ["--asr", asr.uri, "--handle", handle.uri, "--tts", tts.uri]
            code = await asyncio.to_thread(main, argv)
            return code, tts.received

    code, _ = asyncio.run(serve_and_run())
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["transcript_text"] == FR_TRANSCRIPT
    assert set(report["stages"]) >= {"speech_end_to_transcript", "speech_end_to_first_audio"}
    assert (tmp_path / "o.wav").exists()


def test_options_mount_on_a_superwhisper_subparser() -> None:
    """How cli.py wires ``superwhisper pipeline``: add_arguments on a subparser, then run_from_args."""
    parser = argparse.ArgumentParser(prog="superwhisper")
    sub = parser.add_subparsers(dest="command", required=True)
    add_arguments(sub.add_parser("pipeline"))
    args = parser.parse_args(["pipeline", "--wav", "in.wav", "--out", "out.wav", "--fast"])
    assert (args.command, args.wav, args.out, args.fast) == ("pipeline", "in.wav", "out.wav", True)
    assert (args.asr, args.handle, args.tts) == (
        "tcp://127.0.0.1:10300",
        "tcp://127.0.0.1:10400",
        "tcp://127.0.0.1:10200",
    )


def test_cli_failure_exit_codes(stereo_wav: Path, tmp_path: Path) -> None:
    out = str(tmp_path / "o.wav")
    dead = "tcp://127.0.0.1:9"
    assert main(["--wav", str(stereo_wav), "--out", out, "--asr", dead, "--tts", dead]) == 1
    assert main(["--wav", str(tmp_path / "missing.wav"), "--out", out, "--tts", dead]) in (1, 2)


# --- the project's own servers, real models, French speech by espeak-ng ------------------------------

FR_QUESTION = "Quelle est la capitale de la France ?"


def _service(name: str, context: ServiceContext) -> WyomingService:
    module_name, _, class_name = SERVICES[name].partition(":")
    factory = getattr(importlib.import_module(module_name), class_name)
    service: WyomingService = factory(context)
    return service


def assert_spoken(path: Path) -> float:
    """The answer WAV holds real, audible speech; returns its length in seconds."""
    with wave.open(str(path)) as wav:
        assert wav.getsampwidth() == 2 and wav.getnchannels() == 1
        rate = wav.getframerate()
        samples = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")
    seconds = len(samples) / rate
    assert seconds > 0.5, seconds
    assert np.sqrt(np.mean(samples.astype(np.float64) ** 2)) > 200  # not silence
    return seconds


@requires_espeak
@pytest.mark.slow
async def test_pipeline_against_our_three_servers(tmp_path: Path, speech: Callable[..., np.ndarray]) -> None:
    wav = tmp_path / "question.wav"
    write_wav(wav, speech(FR_QUESTION, "fr", 22050).tobytes(), 22050)  # the client resamples to 16 kHz
    context = make_context(make_settings())
    async with (
        serving(_service("asr", context)) as asr,
        serving(_service("handle", context)) as handle,
        serving(_service("tts", context)) as tts,
    ):
        asr_uri, handle_uri, tts_uri = (f"tcp://127.0.0.1:{s.port}" for s in (asr, handle, tts))

        async def run(out: str, realtime: bool, streaming: bool | None = None) -> PipelineTimings:
            return await run_pipeline(
                wav, tmp_path / out, asr_uri, handle_uri, tts_uri, realtime, tts_streaming=streaming
            )

        realtime = await run("realtime.wav", True)
        fast = await run("fast.wav", False)
        single = await run("single.wav", False, streaming=False)

    for timings, out in ((realtime, "realtime.wav"), (fast, "fast.wav"), (single, "single.wav")):
        assert "capitale" in timings.transcript_text.lower(), timings.transcript_text
        assert timings.answer_text, timings
        assert timings.asr_streamed  # our ASR streams transcript-chunk events
        assert_ordered(timings)
        seconds = assert_spoken(tmp_path / out)
        assert timings.output_seconds == pytest.approx(seconds)
    assert realtime.tts_streaming and fast.tts_streaming  # our TTS says supports_synthesize_streaming
    assert not single.tts_streaming
    assert realtime.speech_end is not None and realtime.speech_end >= realtime.audio_seconds * 0.9


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_ready(process: subprocess.Popen[str], url: str, timeout_s: float = 240.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"superwhisper serve exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} not ready within {timeout_s} s")


@requires_espeak
@pytest.mark.slow
def test_superwhisper_serve_then_the_pipeline_command(
    tmp_path: Path, speech: Callable[..., np.ndarray]
) -> None:
    """The user's story: `superwhisper serve`, wait for /readyz, `superwhisper pipeline`, SIGTERM."""
    wav = tmp_path / "question.wav"
    write_wav(wav, speech(FR_QUESTION, "fr", 16000).tobytes(), 16000)
    ports = {name: _free_port() for name in ("asr", "handle", "tts", "ops")}
    bin_dir = Path(sys.executable).parent
    serve = [str(bin_dir / "superwhisper"), "serve", "--no-zeroconf", "--metrics-port", str(ports["ops"])]
    serve += ["--set", "models.environment=test", "--set", "metrics.host=127.0.0.1"]
    for name in ("asr", "handle", "tts"):
        serve += ["--set", f"{name}.uri=tcp://127.0.0.1:{ports[name]}"]
    log = (tmp_path / "serve.log").open("w")
    process = subprocess.Popen(serve, stdout=log, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    try:
        _wait_ready(process, f"http://127.0.0.1:{ports['ops']}/readyz")
        client = [str(bin_dir / "superwhisper"), "pipeline", "--wav", str(wav), "--json"]
        client += ["--out", str(tmp_path / "answer.wav"), "--fast"]
        for name in ("asr", "handle", "tts"):
            client += [f"--{name}", f"tcp://127.0.0.1:{ports[name]}"]
        result = subprocess.run(client, capture_output=True, text=True, timeout=180, check=False)
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert "capitale" in report["transcript_text"].lower()
        assert report["answer_text"]
        assert all(value is not None and value >= 0 for value in report["stages"].values())
        assert_spoken(tmp_path / "answer.wav")
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
            raise
        finally:
            log.close()
    assert code == 0, (tmp_path / "serve.log").read_text()[-3000:]
