"""Text-to-speech engines: Piper (in process), espeak-ng (subprocess), a remote Wyoming server.

Engines know nothing of the Wyoming *server*: they turn one segment of text
into one :class:`Audio` (16-bit PCM, mono, at the voice's native rate). The
handler decides what is sent, the chain decides which engine answers, and
:func:`check_audio` is the quality gate that lets a chain move on when an
engine answers with silence or a stub.

Piper voices stay loaded for the life of the service and are warmed with one
short synthesis at load (the first ONNX run is several times slower than the
next ones). Piper synthesis runs in a thread under one lock per voice, so the
event loop keeps answering ``describe`` and other clients; espeak-ng runs as
an asynchronous subprocess that writes its WAV to a pipe (no temp files).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import json
import logging
import math
import struct
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

from ..runtime.fallback import EngineError, engine_turn, until_done

_LOGGER = logging.getLogger(__name__)

SAMPLE_WIDTH = 2
"""Every engine answers 16-bit signed little-endian PCM."""
CHANNELS = 1


@dataclass(frozen=True)
class Audio:
    """Mono 16-bit PCM at ``rate`` Hz, with the engine that made it (provenance)."""

    pcm: bytes
    rate: int
    engine: str = ""

    @property
    def samples(self) -> int:
        return len(self.pcm) // SAMPLE_WIDTH

    @property
    def seconds(self) -> float:
        return self.samples / self.rate if self.rate else 0.0

    def rms(self) -> float:
        """Root mean square of the samples (int16 scale); 0 for no audio."""
        if self.samples == 0:
            return 0.0
        data = np.frombuffer(self.pcm[: self.samples * SAMPLE_WIDTH], dtype="<i2").astype(np.float64)
        return float(math.sqrt(float(np.mean(data * data))))

    def resampled(self, rate: int) -> Audio:
        """The same audio at another rate (soxr, high quality); itself when already there."""
        if rate == self.rate or self.samples == 0:
            return self if rate == self.rate else Audio(b"", rate, self.engine)
        import soxr

        data = np.frombuffer(self.pcm[: self.samples * SAMPLE_WIDTH], dtype="<i2")
        out = soxr.resample(data, self.rate, rate, quality="HQ")
        return Audio(np.asarray(out, dtype="<i2").tobytes(), rate, self.engine)


@dataclass(frozen=True)
class SynthesisOptions:
    """Per-request choices an engine may honour."""

    speaker: str | None = None
    """Speaker name or index (multi-speaker Piper voices; a remote server's speaker)."""
    length_scale: float = 1.0
    """Speaking speed: >1 slower, <1 faster."""
    priority: tuple[float, float] = (0.0, 0.0)
    """Order among requests waiting for the same voice, lower first: the handler passes
    (0 for an answer's first segment else 1, the answer's start time), so every client
    hears its first words early and then answers finish in arrival order."""


class PriorityLock:
    """An asyncio lock whose waiters get it by priority, then by arrival.

    A voice synthesizes one segment at a time; with a plain FIFO lock, four
    answers interleave segment by segment and all finish last. Served by
    priority, each answer's first segment goes first, then answers finish one
    after the other: the same first-audio time for everyone, earlier ends.
    """

    def __init__(self) -> None:
        self._held = False
        self._waiters: list[tuple[tuple[float, float], int, asyncio.Future[None]]] = []
        self._arrivals = itertools.count()

    @property
    def locked(self) -> bool:
        return self._held

    @contextlib.asynccontextmanager
    async def hold(self, priority: tuple[float, float] = (0.0, 0.0)) -> AsyncIterator[None]:
        if self._held or self._waiters:
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            heapq.heappush(self._waiters, (priority, next(self._arrivals), future))
            try:
                await future
            except asyncio.CancelledError:
                if future.done() and not future.cancelled():
                    self._release()  # handed over just as we were cancelled: pass it on
                raise
        else:
            self._held = True
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        while self._waiters:
            _, _, future = heapq.heappop(self._waiters)
            if not future.done():
                future.set_result(None)  # ownership moves to that waiter
                return
        self._held = False


@dataclass(frozen=True)
class VoiceInfo:
    """What ``describe`` says about one voice."""

    name: str
    languages: tuple[str, ...]
    description: str
    attribution_name: str
    attribution_url: str
    version: str | None
    installed: bool
    speakers: tuple[str, ...] = ()


class TtsEngine(ABC):
    """One voice: load, synthesize one segment, close."""

    name: str
    device: str
    quality: int
    native_rate: int
    """Sample rate (Hz) this voice produces; 0 when unknown until it answers."""

    @abstractmethod
    async def load(self) -> None: ...

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    async def synthesize(self, text: str, options: SynthesisOptions) -> Audio:
        """Speak ``text`` (already normalized); raise :class:`EngineError` on failure."""

    def speakers(self) -> tuple[str, ...]:
        return ()


# --- quality gate -------------------------------------------------------------------

MIN_RMS = 50.0
"""Below this RMS (int16 scale, about -56 dBFS) the audio is taken for silence."""
MIN_SECONDS_PER_CHAR = 1 / 60
"""Faster than 60 characters a second (four times a brisk speaker) is not speech."""
MAX_SECONDS_PER_CHAR = 1 / 3
MAX_EXTRA_SECONDS = 2.5
"""Slower than 3 characters a second plus 2.5 s of padding is a voice that babbles."""


def check_audio(audio: Audio, text: str, length_scale: float = 1.0) -> str | None:
    """The quality gate: None to accept, else the reason for the next voice to answer.

    Non-empty, not silent (RMS), and a duration plausible for the text length,
    scaled by the speaking speed.
    """
    if audio.samples == 0:
        return "no audio"
    rms = audio.rms()
    if rms < MIN_RMS:
        return f"silent (rms {rms:.0f})"
    chars = sum(1 for ch in text if ch.isalnum())
    scale = max(0.25, min(length_scale, 4.0))
    low = chars * MIN_SECONDS_PER_CHAR * scale
    high = (chars * MAX_SECONDS_PER_CHAR + MAX_EXTRA_SECONDS) * scale
    if audio.seconds < low:
        return f"{audio.seconds:.2f} s is too short for {chars} characters"
    if audio.seconds > high:
        return f"{audio.seconds:.2f} s is too long for {chars} characters"
    return None


# --- Piper ------------------------------------------------------------------------


@dataclass
class PiperEngine(TtsEngine):
    """A Piper ONNX voice (``piper-tts``), kept loaded; synthesis in a thread under a lock."""

    model_path: Path
    config_path: Path | None = None
    name: str = "piper"
    quality: int = 2
    device: str = "cpu"
    speaker: str | None = None
    """Default speaker (name or index) for multi-speaker voices."""
    length_scale: float = 1.0
    """Default speaking speed of this voice; multiplied by the request's."""
    warm_text: str = "Bonjour."
    native_rate: int = 0
    speaker_names: tuple[str, ...] = field(default=(), init=False)
    """Speakers of a multi-speaker voice, known once loaded."""
    _voice: Any = field(default=None, init=False, repr=False)
    _lock: PriorityLock = field(default_factory=PriorityLock, init=False, repr=False)

    def __post_init__(self) -> None:
        config = self.config_path or Path(f"{self.model_path}.json")
        self.config_path = config
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            self.native_rate = int(json.loads(config.read_text("utf-8"))["audio"]["sample_rate"])

    async def load(self) -> None:
        if self._voice is not None:
            return
        async with self._lock.hold((-1.0, 0.0)):
            if self._voice is None:
                self._voice = await until_done(asyncio.to_thread(self._load_and_warm))

    def _load_and_warm(self) -> Any:
        from piper import PiperVoice

        try:
            # ONNX Runtime's defaults (all cores, spinning worker threads) measured best here:
            # without spinning, four clients' p95 doubled (bench/tts_bench.py).
            voice = PiperVoice.load(
                str(self.model_path),
                config_path=str(self.config_path),
                use_cuda=self.device.startswith("cuda"),
            )
        except Exception as error:  # onnxruntime raises its own types for a corrupt file
            raise EngineError(f"cannot load Piper voice {self.model_path.name}: {error}") from error
        self.native_rate = int(voice.config.sample_rate)
        mapping: dict[str, int] = dict(voice.config.speaker_id_map)
        self.speaker_names = tuple(sorted(mapping, key=lambda speaker: mapping[speaker]))
        for _ in voice.synthesize(self.warm_text):  # the first ONNX run is slow: pay it now
            pass
        return voice

    async def close(self) -> None:
        async with self._lock.hold((-1.0, 0.0)):
            self._voice = None

    def speakers(self) -> tuple[str, ...]:
        return self.speaker_names

    def _speaker_id(self, speaker: str | None) -> int | None:
        voice = self._voice
        wanted = speaker if speaker is not None else self.speaker
        if voice is None or voice.config.num_speakers <= 1 or wanted in (None, ""):
            return None
        mapping = voice.config.speaker_id_map
        if wanted in mapping:
            return int(mapping[wanted])
        if str(wanted).isdigit() and int(str(wanted)) < voice.config.num_speakers:
            return int(str(wanted))
        raise EngineError(f"{self.name}: no speaker {wanted!r} (known: {', '.join(mapping) or 'none'})")

    async def synthesize(self, text: str, options: SynthesisOptions) -> Audio:
        if self._voice is None:
            raise EngineError(f"{self.name} is not loaded")
        speaker_id = self._speaker_id(options.speaker)
        scale = self.length_scale * options.length_scale
        async with engine_turn(self._lock.hold(options.priority)):
            voice = self._voice
            if voice is None:
                raise EngineError(f"{self.name} was closed")
            pcm = await until_done(asyncio.to_thread(self._run, voice, text, speaker_id, scale))
        return Audio(pcm, self.native_rate, self.name)

    @staticmethod
    def _run(voice: Any, text: str, speaker_id: int | None, length_scale: float) -> bytes:
        from piper import SynthesisConfig

        config = SynthesisConfig(speaker_id=speaker_id, length_scale=length_scale)
        try:
            return b"".join(chunk.audio_int16_bytes for chunk in voice.synthesize(text, config))
        except Exception as error:  # onnxruntime errors on a broken graph surface here
            raise EngineError(f"Piper synthesis failed: {error}") from error


# --- espeak-ng --------------------------------------------------------------------

ESPEAK_WPM = 150
"""espeak-ng's default speed, words per minute; divided by the length scale."""


@dataclass
class EspeakEngine(TtsEngine):
    """espeak-ng as an asynchronous subprocess writing WAV to stdout; always there."""

    binary: Path
    voice: str = "fr"
    name: str = "espeak-ng"
    quality: int = 0
    device: str = "cpu"
    native_rate: int = 22050
    max_concurrent: int = 2
    """Processes running at once (the machine's cores; more only queue in the kernel)."""
    _gate: asyncio.Semaphore = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._gate = asyncio.Semaphore(self.max_concurrent)

    async def load(self) -> None:
        if not await asyncio.to_thread(Path(self.binary).exists):
            raise EngineError(f"{self.binary} not found (apt install espeak-ng)")

    async def close(self) -> None:
        return None

    async def synthesize(self, text: str, options: SynthesisOptions) -> Audio:
        speed = max(80, min(450, round(ESPEAK_WPM / max(options.length_scale, 0.1))))
        voice = self.voice if not options.speaker else f"{self.voice}+{options.speaker}"
        async with engine_turn(self._gate):
            try:
                process = await asyncio.create_subprocess_exec(
                    str(self.binary), "-v", voice, "-s", str(speed), "--stdout", "--stdin",
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                )
            except OSError as error:
                raise EngineError(f"cannot run {self.binary}: {error}") from error
            try:
                stdout, stderr = await process.communicate(text.encode("utf-8"))
            except asyncio.CancelledError:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
                raise
        if process.returncode != 0:
            message = stderr.decode("utf-8", "replace").strip()
            raise EngineError(f"espeak-ng exited with {process.returncode}: {message}")
        rate, pcm = parse_wav(stdout)
        self.native_rate = rate
        return Audio(pcm, rate, self.name)


def parse_wav(data: bytes) -> tuple[int, bytes]:
    """Sample rate and PCM of a 16-bit mono WAV, tolerating the unknown sizes of a piped WAV."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise EngineError("not a WAV stream")
    offset = 12
    rate = 0
    while offset + 8 <= len(data):
        chunk_id = data[offset : offset + 4]
        size = struct.unpack_from("<I", data, offset + 4)[0]
        body = offset + 8
        if chunk_id == b"fmt ":
            fmt, channels, rate, _, _, bits = struct.unpack_from("<HHIIHH", data, body)
            if fmt != 1 or channels != 1 or bits != 16:
                raise EngineError(f"unsupported WAV format {fmt}/{channels} ch/{bits} bit")
        elif chunk_id == b"data":
            end = len(data) if size >= 0x7FFF0000 or body + size > len(data) else body + size
            pcm = data[body:end]
            return rate, pcm[: len(pcm) - len(pcm) % SAMPLE_WIDTH]
        offset = body + size + (size & 1)
    raise EngineError("WAV stream has no data chunk")


# --- remote Wyoming TTS -------------------------------------------------------------


@dataclass
class RemoteWyomingEngine(TtsEngine):
    """Any Wyoming TTS server (another superwhisper, wyoming-piper...) at ``tcp://host:port``."""

    uri: str
    voice: str | None = None
    """Voice name to ask the remote server for; None: its default."""
    name: str = "remote"
    quality: int = 1
    device: str = "remote"
    native_rate: int = 0
    connect_timeout_s: float = 3.0

    def __post_init__(self) -> None:
        parsed = urlparse(self.uri)
        if parsed.scheme != "tcp" or not parsed.hostname or not parsed.port:
            raise ValueError(f"remote TTS must be tcp://host:port, not {self.uri!r}")
        self._host, self._port = parsed.hostname, parsed.port

    async def load(self) -> None:
        return None  # connections are made per request: a remote that comes back just works

    async def close(self) -> None:
        return None

    async def synthesize(self, text: str, options: SynthesisOptions) -> Audio:
        from wyoming.audio import AudioChunk, AudioStart, AudioStop
        from wyoming.client import AsyncTcpClient
        from wyoming.error import Error
        from wyoming.tts import Synthesize, SynthesizeVoice

        voice = (
            SynthesizeVoice(name=self.voice, speaker=options.speaker) if self.voice else None
        )
        client = AsyncTcpClient(self._host, self._port)
        try:
            await asyncio.wait_for(client.connect(), self.connect_timeout_s)
        except (OSError, TimeoutError) as error:
            raise EngineError(f"cannot reach {self.uri}: {error or 'timeout'}") from error
        try:
            await client.write_event(Synthesize(text=text, voice=voice).event())
            rate = 0
            parts: list[bytes] = []
            while True:
                event = await client.read_event()
                if event is None:
                    raise EngineError(f"{self.uri} closed the connection mid-answer")
                if Error.is_type(event.type):
                    raise EngineError(f"{self.uri}: {Error.from_event(event).text}")
                if AudioStart.is_type(event.type):
                    start = AudioStart.from_event(event)
                    rate = start.rate
                    _check_format(start.width, start.channels, self.uri)
                elif AudioChunk.is_type(event.type):
                    chunk = AudioChunk.from_event(event)
                    _check_format(chunk.width, chunk.channels, self.uri)
                    rate = rate or chunk.rate
                    parts.append(chunk.audio)
                elif AudioStop.is_type(event.type):
                    break
        except (OSError, KeyError, ValueError) as error:
            raise EngineError(f"{self.uri}: {error}") from error
        finally:
            with contextlib.suppress(OSError):
                await client.disconnect()
        if not rate:
            raise EngineError(f"{self.uri} sent no audio format")
        self.native_rate = rate
        return Audio(b"".join(parts), rate, self.name)


def _check_format(width: int, channels: int, uri: str) -> None:
    if width != SAMPLE_WIDTH or channels != CHANNELS:
        raise EngineError(f"{uri} answered {width * 8}-bit, {channels}-channel audio; 16-bit mono needed")
