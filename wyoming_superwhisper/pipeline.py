"""A Wyoming pipeline client that behaves like Home Assistant's Assist pipeline.

``superwhisper pipeline --wav in.wav --out answer.wav`` is how a user tries the
whole assistant without Home Assistant, and how the end-to-end benchmark
measures it. It talks to *any* Wyoming servers (ours or the peer servers), so
it only uses what the protocol promises:

1. ASR: ``transcribe`` + ``audio-start``, the WAV as 16 kHz mono 16-bit chunks
   (paced in real time like a microphone, or as fast as possible), then
   ``audio-stop``; the answer is ``transcript`` (``transcript-start/-chunk/-stop``
   streaming is accepted too, and a server that ends the utterance by itself
   stops the audio early).
2. Handle: the transcript as a ``transcript`` event; the answer as
   ``handled``/``not-handled`` or streamed ``handled-start/-chunk/-stop``.
3. TTS: while the answer is still being written, each answer chunk goes to the
   TTS server as ``synthesize-chunk`` between ``synthesize-start`` and
   ``synthesize-stop`` (when its ``info`` says ``supports_synthesize_streaming``;
   otherwise one ``synthesize`` with the whole answer, as Home Assistant 2025.4
   does). The audio is written to a WAV file.

Timings are measured on one monotonic clock from the moment the speech ends
(the last audio chunk is sent), because that is what a user waits through.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import sys
import time
import wave
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from wyoming.asr import Transcribe, Transcript, TranscriptChunk, TranscriptStart, TranscriptStop
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncClient
from wyoming.error import Error
from wyoming.event import Event
from wyoming.handle import Handled, HandledChunk, HandledStart, HandledStop, NotHandled
from wyoming.info import Describe, Info
from wyoming.tts import (
    Synthesize,
    SynthesizeChunk,
    SynthesizeStart,
    SynthesizeStop,
    SynthesizeStopped,
    SynthesizeVoice,
)

from .audio import AudioFormatError, convert_pcm

_LOGGER = logging.getLogger(__name__)

RATE, WIDTH, CHANNELS = 16000, 2, 1
"""What Home Assistant sends to a Wyoming ASR server: 16 kHz, 16-bit, mono."""
DEFAULT_CHUNK_MS = 20
DEFAULT_ASR_URI = "tcp://127.0.0.1:10300"
DEFAULT_HANDLE_URI = "tcp://127.0.0.1:10400"
DEFAULT_TTS_URI = "tcp://127.0.0.1:10200"


class PipelineError(Exception):
    """A stage failed: a server sent ``error``, closed the connection or timed out."""

    def __init__(self, stage: str, text: str, code: str | None = None) -> None:
        super().__init__(f"{stage}: {text}" + (f" ({code})" if code else ""))
        self.stage = stage
        self.text = text
        self.code = code


@dataclass
class PipelineTimings:
    """What one run did and when; times are seconds on one monotonic clock from the run's start.

    ``None`` means the event never happened (e.g. no answer text, no audio).
    """

    audio_seconds: float = 0.0
    """Length of the input speech."""
    audio_started: float | None = None
    """The first audio chunk was sent: with real-time pacing, where the audio's own
    clock starts (a benchmark knows when the speech in it ends)."""
    speech_end: float | None = None
    """The last audio chunk was sent (or the ASR server ended the utterance itself)."""
    transcript: float | None = None
    """The final transcript arrived."""
    first_answer_chunk: float | None = None
    """The first answer text arrived from the handle server."""
    answer_done: float | None = None
    """The handle server finished its answer."""
    first_audio: float | None = None
    """The first audio byte of the spoken answer arrived."""
    done: float | None = None
    """The TTS server finished; the WAV is written."""
    transcript_text: str = ""
    answer_text: str = ""
    handled: bool = True
    """False when the handle server answered ``not-handled`` (its text is still spoken)."""
    answer_chunks: int = 0
    asr_streamed: bool = False
    """The ASR server sent ``transcript-chunk`` events."""
    tts_streaming: bool = False
    """The answer went to TTS as ``synthesize-chunk`` events while being written."""
    output_rate: int = 0
    output_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def stages(self) -> dict[str, float | None]:
        """Per-stage latencies in seconds: what a user waits through, step by step."""

        def between(a: float | None, b: float | None) -> float | None:
            return None if a is None or b is None else b - a

        return {
            "speech_end_to_transcript": between(self.speech_end, self.transcript),
            "transcript_to_first_answer_chunk": between(self.transcript, self.first_answer_chunk),
            "first_answer_chunk_to_first_audio": between(self.first_answer_chunk, self.first_audio),
            "speech_end_to_first_audio": between(self.speech_end, self.first_audio),
            "speech_end_to_done": between(self.speech_end, self.done),
        }

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["stages"] = self.stages()
        return data

    def table(self) -> str:
        """Human-readable summary, printed by the CLI."""
        lines = [
            f"transcript: {self.transcript_text!r}",
            f"answer:     {self.answer_text!r}" + ("" if self.handled else " (not handled)"),
            f"audio:      {self.audio_seconds:.2f} s in, {self.output_seconds:.2f} s out"
            + (f" at {self.output_rate} Hz" if self.output_rate else ""),
        ]
        for name, value in self.stages().items():
            shown = "—" if value is None else f"{value * 1000:8.0f} ms"
            lines.append(f"{name.replace('_', ' '):36s} {shown}")
        return "\n".join(lines)


# --- audio in and out --------------------------------------------------------------------------


def read_wav_16k(path: str | Path) -> bytes:
    """A WAV file as 16 kHz mono signed 16-bit PCM (what an Assist pipeline sends)."""
    with wave.open(str(path), "rb") as wav:
        rate, width, channels = wav.getframerate(), wav.getsampwidth(), wav.getnchannels()
        raw = wav.readframes(wav.getnframes())
    return to_pcm16_mono(raw, rate, width, channels, RATE)


def to_pcm16_mono(raw: bytes, rate: int, width: int, channels: int, target_rate: int) -> bytes:
    """Integer PCM of any common width/channel count/rate → mono s16 at ``target_rate``."""
    try:
        return convert_pcm(raw, rate, width, channels, target_rate)
    except AudioFormatError as error:
        raise ValueError(str(error)) from error


def write_wav(path: str | Path, pcm: bytes, rate: int, width: int = WIDTH, channels: int = CHANNELS) -> None:
    with wave.open(str(path), "wb") as wav:
        wav.setframerate(rate)
        wav.setsampwidth(width)
        wav.setnchannels(channels)
        wav.writeframes(pcm)


# --- the client ---------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def connect_stage(stage: str, uri: str, timeout_s: float) -> AsyncIterator[AsyncClient]:
    """A connected client for one stage; a refused or slow connection is a PipelineError naming it."""
    client = AsyncClient.from_uri(uri, connect_timeout=timeout_s, read_timeout=timeout_s)
    try:
        await asyncio.wait_for(client.connect(), timeout=timeout_s)
    except (OSError, TimeoutError) as error:
        raise PipelineError(stage, f"cannot connect to {uri}: {error}", "connect") from error
    try:
        yield client
    finally:
        with contextlib.suppress(OSError):
            await client.disconnect()


async def read_stage(stage: str, client: AsyncClient) -> Event:
    """The next event; ``error`` events, a closed connection and timeouts become PipelineError."""
    try:
        event = await client.read_event()
    except TimeoutError as error:
        raise PipelineError(stage, "no answer in time", "timeout") from error
    except OSError as error:
        raise PipelineError(stage, f"connection failed: {error}", "connection") from error
    if event is None:
        raise PipelineError(stage, "the server closed the connection", "closed")
    if Error.is_type(event.type):
        error_event = Error.from_event(event)
        raise PipelineError(stage, error_event.text, error_event.code)
    return event


async def describe(uri: str, timeout_s: float = 10.0) -> Info:
    """Ask a server what it offers (Home Assistant does this when the server is added)."""
    async with connect_stage("describe", uri, timeout_s) as client:
        await client.write_event(Describe().event())
        while True:
            event = await read_stage("describe", client)
            if Info.is_type(event.type):
                return Info.from_event(event)


def supports_synthesize_streaming(info: Info) -> bool:
    return any(program.supports_synthesize_streaming for program in info.tts if program.installed)


class StageClock:
    """Seconds since the pipeline started: every stage of one run is timed on one clock."""

    def __init__(self) -> None:
        self.start = time.monotonic()

    def now(self) -> float:
        return time.monotonic() - self.start


async def stream_transcribe(
    client: AsyncClient,
    pcm: bytes,
    *,
    language: str | None,
    realtime: bool,
    chunk_ms: int,
    clock: StageClock,
    timings: PipelineTimings,
) -> str:
    """Stream the audio while reading the ASR server's events; returns the final transcript."""
    await client.write_event(Transcribe(language=language).event())
    await client.write_event(AudioStart(RATE, WIDTH, CHANNELS).event())
    step = RATE * WIDTH * CHANNELS * chunk_ms // 1000
    finished = asyncio.Event()
    chunks: list[str] = []

    async def send_audio() -> None:
        started = time.monotonic()
        timings.audio_started = clock.now()
        sent_samples = 0
        for offset in range(0, len(pcm), step):
            if finished.is_set():  # the server ended the utterance by itself (endpointing)
                break
            piece = pcm[offset : offset + step]
            await client.write_event(AudioChunk(RATE, WIDTH, CHANNELS, piece).event())
            sent_samples += len(piece) // (WIDTH * CHANNELS)
            if realtime:
                delay = started + sent_samples / RATE - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
        if timings.speech_end is None:
            timings.speech_end = clock.now()
        await client.write_event(AudioStop().event())

    async def receive() -> str:
        while True:
            event = await read_stage("asr", client)
            if Transcript.is_type(event.type):
                return Transcript.from_event(event).text
            if TranscriptStart.is_type(event.type):
                continue
            if TranscriptChunk.is_type(event.type):
                timings.asr_streamed = True
                chunks.append(TranscriptChunk.from_event(event).text)
            elif TranscriptStop.is_type(event.type):
                return "".join(chunks)
            else:
                _LOGGER.debug("asr: ignoring %s", event.type)

    sender = asyncio.create_task(send_audio(), name="pipeline-send-audio")
    try:
        text = await receive()
    except BaseException:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError, OSError):
            await sender
        raise
    finished.set()
    if timings.speech_end is None:  # transcript before the audio ran out: the server endpointed
        timings.speech_end = clock.now()
    with contextlib.suppress(OSError):
        await sender
    timings.transcript = clock.now()
    return text.strip()


async def run_pipeline(
    wav_path: str | Path,
    out_path: str | Path,
    asr_uri: str = DEFAULT_ASR_URI,
    handle_uri: str = DEFAULT_HANDLE_URI,
    tts_uri: str = DEFAULT_TTS_URI,
    realtime: bool = True,
    *,
    language: str | None = "fr",
    voice: str | None = None,
    chunk_ms: int = DEFAULT_CHUNK_MS,
    timeout_s: float = 60.0,
    tts_streaming: bool | None = None,
) -> PipelineTimings:
    """Run one voice command through ASR → handle → TTS like Home Assistant's Assist pipeline.

    ``realtime`` paces the audio like a microphone (the latency a user feels);
    ``False`` sends it as fast as the socket takes it (the benchmark's mode).
    ``tts_streaming`` forces streaming synthesis on or off; ``None`` asks the
    TTS server's ``info``. Raises :class:`PipelineError` naming the failed stage.
    """
    if not 5 <= chunk_ms <= 200:
        raise ValueError(f"chunk_ms must be within 5..200, not {chunk_ms}")
    pcm = read_wav_16k(wav_path)
    timings = PipelineTimings(audio_seconds=len(pcm) / (RATE * WIDTH * CHANNELS))
    if tts_streaming is None:  # Home Assistant learns this when the server is added, not per run
        tts_streaming = supports_synthesize_streaming(await describe(tts_uri, timeout_s))
    timings.tts_streaming = tts_streaming
    clock = StageClock()

    async with connect_stage("asr", asr_uri, timeout_s) as asr:
        transcript = await stream_transcribe(
            asr, pcm, language=language, realtime=realtime, chunk_ms=chunk_ms, clock=clock, timings=timings
        )
    timings.transcript_text = transcript
    _LOGGER.info("pipeline: transcript %r", transcript)

    audio = bytearray()
    answer_queue: asyncio.Queue[str | None] = asyncio.Queue()

    async def handle() -> None:
        async with connect_stage("handle", handle_uri, timeout_s) as client:
            await client.write_event(Transcript(text=transcript, language=language).event())
            while True:
                event = await read_stage("handle", client)
                if HandledStart.is_type(event.type):
                    continue
                if HandledChunk.is_type(event.type):
                    _answer(HandledChunk.from_event(event).text)
                    continue
                if HandledStop.is_type(event.type):
                    break
                if Handled.is_type(event.type) or NotHandled.is_type(event.type):
                    final = event.data.get("text") or ""
                    timings.handled = Handled.is_type(event.type)
                    if not timings.answer_chunks:  # not streamed: the whole answer at once
                        _answer(final)
                    break
                _LOGGER.debug("handle: ignoring %s", event.type)
        timings.answer_done = clock.now()
        answer_queue.put_nowait(None)

    def _answer(text: str) -> None:
        if not text:
            return
        if timings.first_answer_chunk is None:
            timings.first_answer_chunk = clock.now()
        timings.answer_chunks += 1
        timings.answer_text += text
        answer_queue.put_nowait(text)

    async def speak() -> None:
        synth_voice = SynthesizeVoice(name=voice) if voice else None
        async with connect_stage("tts", tts_uri, timeout_s) as client:
            if tts_streaming:
                # Read audio while text is still being written: the first sentence's audio
                # comes back long before the answer ends, and that moment is what we time.
                collecting = asyncio.create_task(_collect_audio(client), name="pipeline-audio")
                try:
                    await client.write_event(SynthesizeStart(voice=synth_voice).event())
                    while (piece := await answer_queue.get()) is not None:
                        await client.write_event(SynthesizeChunk(text=piece).event())
                    await client.write_event(SynthesizeStop().event())
                    await collecting
                finally:
                    collecting.cancel()
                return
            else:
                pieces = []
                while (piece := await answer_queue.get()) is not None:
                    pieces.append(piece)
                text = "".join(pieces).strip()
                if not text:
                    return
                await client.write_event(Synthesize(text=text, voice=synth_voice).event())
            await _collect_audio(client)

    async def _collect_audio(client: AsyncClient) -> None:
        stopped = False
        while True:
            event = await read_stage("tts", client)
            if AudioStart.is_type(event.type):
                start = AudioStart.from_event(event)
                if not timings.output_rate:
                    timings.output_rate = start.rate
                continue
            if AudioChunk.is_type(event.type):
                chunk = AudioChunk.from_event(event)
                if not timings.output_rate:
                    timings.output_rate = chunk.rate
                if chunk.audio and timings.first_audio is None:
                    timings.first_audio = clock.now()
                if (chunk.rate, chunk.width, chunk.channels) != (timings.output_rate, WIDTH, CHANNELS):
                    audio.extend(
                        to_pcm16_mono(
                            chunk.audio, chunk.rate, chunk.width, chunk.channels, timings.output_rate
                        )
                    )
                else:
                    audio.extend(chunk.audio)
                continue
            if AudioStop.is_type(event.type):
                stopped = True
                if not tts_streaming:
                    return
                continue
            if SynthesizeStopped.is_type(event.type):
                if not stopped:
                    _LOGGER.warning("tts: synthesize-stopped without audio-stop")
                return
            _LOGGER.debug("tts: ignoring %s", event.type)

    handle_task = asyncio.create_task(handle(), name="pipeline-handle")
    speak_task = asyncio.create_task(speak(), name="pipeline-speak")
    try:
        await asyncio.gather(handle_task, speak_task)
    except BaseException:
        for task in (handle_task, speak_task):
            task.cancel()
        await asyncio.gather(handle_task, speak_task, return_exceptions=True)
        raise
    timings.done = clock.now()
    rate = timings.output_rate or 22050
    write_wav(out_path, bytes(audio), rate)
    timings.output_seconds = len(audio) / (rate * WIDTH * CHANNELS)
    timings.answer_text = timings.answer_text.strip()
    return timings


# --- command line -------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The pipeline's options, for this module's parser or a ``superwhisper pipeline`` subparser."""
    parser.add_argument("--wav", required=True, help="the spoken command (any rate/width/channels)")
    parser.add_argument("--out", required=True, help="where to write the spoken answer (WAV)")
    parser.add_argument("--asr", default=DEFAULT_ASR_URI, help=f"ASR server (default {DEFAULT_ASR_URI})")
    parser.add_argument(
        "--handle", default=DEFAULT_HANDLE_URI, help=f"handle server (default {DEFAULT_HANDLE_URI})"
    )
    parser.add_argument("--tts", default=DEFAULT_TTS_URI, help=f"TTS server (default {DEFAULT_TTS_URI})")
    parser.add_argument("--fast", action="store_true", help="send the audio as fast as possible")
    parser.add_argument("--language", default="fr", help="language sent with transcribe (default fr)")
    parser.add_argument("--voice", help="TTS voice name (default: the server's choice)")
    parser.add_argument("--chunk-ms", type=int, default=DEFAULT_CHUNK_MS, help="audio chunk length")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for any answer")
    parser.add_argument(
        "--no-tts-streaming", action="store_true", help="one synthesize event even if streaming is offered"
    )
    parser.add_argument("--json", action="store_true", help="print the timings as JSON")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="superwhisper pipeline",
        description="Run a WAV through ASR → handle → TTS like Home Assistant's Assist pipeline.",
    )
    add_arguments(parser)
    return parser


def run_from_args(args: argparse.Namespace) -> int:
    """Run with parsed options; prints the timings. 0 ok, 1 a stage failed, 2 bad input."""
    try:
        timings = asyncio.run(
            run_pipeline(
                args.wav,
                args.out,
                args.asr,
                args.handle,
                args.tts,
                realtime=not args.fast,
                language=args.language or None,
                voice=args.voice,
                chunk_ms=args.chunk_ms,
                timeout_s=args.timeout,
                tts_streaming=False if args.no_tts_streaming else None,
            )
        )
    except (OSError, ValueError, wave.Error) as error:
        _LOGGER.error("pipeline: %s", error)
        return 2
    except PipelineError as error:
        _LOGGER.error("pipeline failed at %s", error)
        return 1
    sys.stdout.write((json.dumps(timings.to_dict(), indent=2) if args.json else timings.table()) + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``superwhisper pipeline``: 0 on success, 1 when a stage failed, 2 on bad arguments."""
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return run_from_args(args)


if __name__ == "__main__":
    raise SystemExit(main())
