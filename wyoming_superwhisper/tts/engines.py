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
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, AsyncIterator
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
class AudioPart:
    """A piece of one segment's audio, sent on as soon as the voice has decoded it."""

    audio: Audio
    expected_samples: int
    """The whole segment's length in samples, known before its first piece: the
    quality gate judges the duration before anything is heard."""


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
    return check_duration(audio.seconds, text, length_scale)


def check_duration(seconds: float, text: str, length_scale: float = 1.0) -> str | None:
    """The gate's duration half: judged before a streamed segment's first piece goes out."""
    chars = sum(1 for ch in text if ch.isalnum())
    scale = max(0.25, min(length_scale, 4.0))
    low = chars * MIN_SECONDS_PER_CHAR * scale
    high = (chars * MAX_SECONDS_PER_CHAR + MAX_EXTRA_SECONDS) * scale
    if seconds < low:
        return f"{seconds:.2f} s is too short for {chars} characters"
    if seconds > high:
        return f"{seconds:.2f} s is too long for {chars} characters"
    return None


# --- Piper ------------------------------------------------------------------------


@dataclass
class PiperEngine(TtsEngine):
    """A Piper ONNX voice (``piper-tts``), kept loaded; synthesis in a thread under a lock.

    With ``chunked`` (``tts.chunked_decode``), the voice's graph is cut at its
    decoder's input (:mod:`.vits_chunks`, cached under ``split_dir``): a sentence
    is encoded once, then decoded in chunks that :meth:`synthesize_stream` yields
    as they come, so its first audio goes out long before it is rendered. A graph
    that cannot be cut is synthesized whole, as piper-tts does (logged once).
    """

    model_path: Path
    config_path: Path | None = None
    name: str = "piper"
    quality: int = 2
    device: str = "cpu"
    speaker: str | None = None
    """Default speaker (name or index) for multi-speaker voices."""
    length_scale: float = 1.0
    """Default speaking speed of this voice; multiplied by the request's."""
    noise_scale: float | None = None
    """Generator noise (None: the voice's config); 0 with ``noise_w`` 0 makes a voice deterministic."""
    noise_w: float | None = None
    """Phoneme width noise (None: the voice's config)."""
    warm_text: str = "Bonjour."
    native_rate: int = 0
    chunked: bool = True
    """Decode sentences in chunks (see the class doc); False: piper-tts's whole-sentence path."""
    split_dir: Path | None = None
    """Where the cut graph is cached (the registry's cache); None: no chunked decoding."""
    chunked_state: str = field(default="", init=False)
    """``chunked`` once the cut voice is loaded, else why the voice is synthesized whole."""
    gain: float = field(default=1.0, init=False)
    """Fixed gain of the chunked path (a sentence's peak is not known before its first chunk)."""
    speaker_names: tuple[str, ...] = field(default=(), init=False)
    """Speakers of a multi-speaker voice, known once loaded."""
    _voice: Any = field(default=None, init=False, repr=False)
    _chunks: Any = field(default=None, init=False, repr=False)
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
                self._voice, self._chunks = await until_done(asyncio.to_thread(self._load_and_warm))

    def _load_and_warm(self) -> tuple[Any, Any]:
        from piper import PiperVoice
        from piper.config import PiperConfig

        chunks = self._load_chunked() if self.chunked else None
        if not self.chunked:
            self.chunked_state = "off (tts.chunked_decode: false)"
        try:
            if chunks is not None:
                # The phonemizer and the config only: synthesis goes through ``chunks``.
                config = PiperConfig.from_dict(json.loads(Path(str(self.config_path)).read_text("utf-8")))
                voice = PiperVoice(session=chunks.encoder, config=config)
            else:
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
        if chunks is not None:
            self.gain = self._calibrate(voice, chunks)  # also pays the first, slow ONNX runs
        else:
            for _ in voice.synthesize(self.warm_text):  # the first ONNX run is slow: pay it now
                pass
        return voice, chunks

    def _load_chunked(self) -> Any:
        """The cut voice, or None (and why, logged once per load) when it cannot be had."""
        from .vits_chunks import ChunkedVits, SplitError, split_voice

        if self.split_dir is None:
            self.chunked_state = "whole: no cache directory for the cut graph"
        else:
            try:
                split = split_voice(self.model_path, self.split_dir)
                chunks = ChunkedVits(split, self._providers())
            except ImportError as error:
                self.chunked_state = f"whole: {error.name or error} is not installed"
            except SplitError as error:
                self.chunked_state = f"whole: the graph cannot be cut ({error})"
            except Exception as error:  # onnx/onnxruntime errors on an odd graph, an unwritable cache
                self.chunked_state = f"whole: cutting the graph failed ({type(error).__name__}: {error})"
            else:
                self.chunked_state = "chunked"
                _LOGGER.info(
                    "%s: chunked decoding (hop %d, %d context frames)", self.name, chunks.hop, chunks.context
                )
                return chunks
        _LOGGER.warning("%s: %s", self.name, self.chunked_state)
        return None

    def _providers(self) -> list[Any]:
        if self.device.startswith("cuda"):
            cuda = ("CUDAExecutionProvider", {"cudnn_conv_algo_search": "HEURISTIC"})  # as piper-tts
            return [cuda, "CPUExecutionProvider"]
        return ["CPUExecutionProvider"]

    def _calibrate(self, voice: Any, chunks: Any) -> float:
        """Gain that brings the loudest calibration sentence to :data:`PEAK_TARGET`.

        piper-tts scales each sentence to its own peak; a streamed sentence's peak
        is not known when its first chunk goes out, so the voice gets one fixed gain.
        """
        from .vits_chunks import calibration_texts

        peaks = []
        for text in (self.warm_text, *calibration_texts(str(voice.config.espeak_voice))):
            for latent in self._encode(voice, chunks, text, None, 1.0, deterministic=True):
                peaks.append(float(np.max(np.abs(chunks.decode(latent)))))
        peak = max(peaks, default=0.0)
        return PEAK_TARGET / peak if peak > 1e-3 else 1.0

    async def close(self) -> None:
        async with self._lock.hold((-1.0, 0.0)):
            self._voice = None
            self._chunks = None

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

    @contextlib.asynccontextmanager
    async def _turn(self, options: SynthesisOptions) -> AsyncIterator[tuple[Any, Any, int | None, float]]:
        """The voice's turn for one request: (voice, cut graph or None, speaker id, length scale)."""
        if self._voice is None:
            raise EngineError(f"{self.name} is not loaded")
        speaker_id = self._speaker_id(options.speaker)
        scale = self.length_scale * options.length_scale
        async with engine_turn(self._lock.hold(options.priority)):
            voice, chunks = self._voice, self._chunks
            if voice is None:
                raise EngineError(f"{self.name} was closed")
            yield voice, chunks, speaker_id, scale

    async def synthesize(self, text: str, options: SynthesisOptions) -> Audio:
        async with self._turn(options) as (voice, chunks, speaker_id, scale):
            if chunks is not None:
                work = asyncio.to_thread(self._run_whole, voice, chunks, text, speaker_id, scale)
                pcm = await until_done(work)
            else:
                pcm = await until_done(asyncio.to_thread(self._run, voice, text, speaker_id, scale))
        return Audio(pcm, self.native_rate, self.name)

    async def synthesize_stream(
        self, text: str, options: SynthesisOptions
    ) -> AsyncGenerator[AudioPart, None]:
        """The segment's audio in pieces, each yielded as soon as it is decoded.

        The voice is held from the first piece to the last; a consumer that stops
        (cancelled, closed) frees it once the chunk being decoded is done.
        """
        async with self._turn(options) as (voice, chunks, speaker_id, scale):
            if chunks is None:
                pcm = await until_done(asyncio.to_thread(self._run, voice, text, speaker_id, scale))
                yield AudioPart(Audio(pcm, self.native_rate, self.name), len(pcm) // SAMPLE_WIDTH)
                return
            from .vits_chunks import ChunkPlanner

            latents = await until_done(
                asyncio.to_thread(self._encode, voice, chunks, text, speaker_id, scale)
            )
            expected = sum(latent.frames for latent in latents) * chunks.hop
            for latent in latents:
                planner = ChunkPlanner(latent.frames, chunks.hop / self.native_rate, chunks.context)
                while (chunk := planner.next()) is not None:
                    started = time.perf_counter()
                    pcm = await until_done(asyncio.to_thread(self._decode, chunks, latent, *chunk))
                    planner.decoded(*chunk, time.perf_counter() - started)
                    yield AudioPart(Audio(pcm, self.native_rate, self.name), expected)

    def _encode(
        self,
        voice: Any,
        chunks: Any,
        text: str,
        speaker_id: int | None,
        length_scale: float,
        *,
        deterministic: bool = False,
    ) -> list[Any]:
        """One latent per sentence piper-tts's phonemizer finds in ``text``."""
        config = voice.config
        noise = config.noise_scale if self.noise_scale is None else self.noise_scale
        noise_w = config.noise_w_scale if self.noise_w is None else self.noise_w
        if deterministic:
            noise = noise_w = 0.0
        scales = np.array([noise, length_scale, noise_w], dtype=np.float32)
        if config.num_speakers > 1 and speaker_id is None:
            speaker_id = config.default_speaker_id
        try:
            latents = []
            for phonemes in voice.phonemize(text):
                if not phonemes:
                    continue
                ids = voice.phonemes_to_ids(phonemes)
                feeds = {
                    "input": np.array([ids], dtype=np.int64),
                    "input_lengths": np.array([len(ids)], dtype=np.int64),
                    "scales": scales,
                }
                if config.num_speakers > 1:
                    feeds["sid"] = np.array([speaker_id or 0], dtype=np.int64)
                latents.append(chunks.encode(feeds))
            return latents
        except Exception as error:  # onnxruntime errors on a broken graph surface here
            raise EngineError(f"Piper synthesis failed: {error}") from error

    def _decode(self, chunks: Any, latent: Any, start: int, end: int | None) -> bytes:
        try:
            audio = chunks.decode(latent, start, end)
        except Exception as error:
            raise EngineError(f"Piper synthesis failed: {error}") from error
        return _to_pcm16(audio * self.gain)

    def _run_whole(
        self, voice: Any, chunks: Any, text: str, speaker_id: int | None, length_scale: float
    ) -> bytes:
        """The same audio as the chunks of :meth:`synthesize_stream`, in one decoder run."""
        latents = self._encode(voice, chunks, text, speaker_id, length_scale)
        return b"".join(self._decode(chunks, latent, 0, None) for latent in latents)

    def _run(self, voice: Any, text: str, speaker_id: int | None, length_scale: float) -> bytes:
        from piper import SynthesisConfig

        config = SynthesisConfig(
            speaker_id=speaker_id,
            length_scale=length_scale,
            noise_scale=self.noise_scale,
            noise_w_scale=self.noise_w,
        )
        try:
            return b"".join(chunk.audio_int16_bytes for chunk in voice.synthesize(text, config))
        except Exception as error:  # onnxruntime errors on a broken graph surface here
            raise EngineError(f"Piper synthesis failed: {error}") from error


PEAK_TARGET = 0.95
"""Peak of the loudest calibration sentence on the chunked path (piper-tts: each sentence at 1.0)."""


def _to_pcm16(audio: np.ndarray) -> bytes:
    """Float samples → 16-bit PCM, clipped as piper-tts does."""
    return (np.clip(audio, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


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
                    str(self.binary),
                    "-v",
                    voice,
                    "-s",
                    str(speed),
                    "--stdout",
                    "--stdin",
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

        voice = SynthesizeVoice(name=self.voice, speaker=options.speaker) if self.voice else None
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
