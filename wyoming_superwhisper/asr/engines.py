"""Speech-to-text engines: faster-whisper in process, or any remote Wyoming ASR server.

Engines know nothing of the Wyoming server side: they take 16 kHz mono
float32 audio with options and return an :class:`AsrResult` that says which
engine and model made it and how confident it was. The quality gate and the
hallucination filter are pure functions here, so they are tested as tables.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

import numpy as np

from ..audio import TARGET_RATE, to_pcm16
from ..runtime.fallback import EngineError, engine_turn, until_done

_LOGGER = logging.getLogger(__name__)


class DecodeCancelled(EngineError):
    """A speculative decode was dropped (speech resumed or the client left)."""


@dataclass(frozen=True)
class AsrRequest:
    """One decode: trimmed 16 kHz mono float32 audio and how to read it."""

    audio: np.ndarray
    language: str
    beam_size: int = 5
    names: tuple[str, ...] = ()
    """Proper names to recognize (devices, rooms, people): faster-whisper hotwords."""
    terms: tuple[str, ...] = ()
    """Domain words, lower priority than names."""

    @property
    def seconds(self) -> float:
        return len(self.audio) / TARGET_RATE


@dataclass(frozen=True)
class AsrResult:
    """A transcript with its provenance and the confidence the quality gate reads."""

    text: str
    language: str
    engine: str
    avg_logprob: float = 0.0
    compression_ratio: float = 1.0
    no_speech_prob: float = 0.0
    decode_seconds: float = 0.0
    dropped: tuple[str, ...] = field(default=())
    """Segments the hallucination filter removed (for logs)."""


class AsrEngine(Protocol):
    """What the ASR chain calls; see ``runtime.fallback.Engine`` for the lifecycle."""

    name: str
    device: str
    quality: int
    model_name: str
    languages: tuple[str, ...]

    async def load(self) -> None: ...

    async def close(self) -> None: ...

    async def transcribe(self, request: AsrRequest, cancel: threading.Event | None = None) -> AsrResult: ...


# --- anti-hallucination ----------------------------------------------------------

HALLUCINATED_PHRASES = (
    "sous-titres réalisés par",
    "sous-titres realises par",
    "sous-titrage st'501",
    "sous-titrage société radio-canada",
    "sous-titres fait par",
    "sous-titres par",
    "merci d'avoir regardé",
    "merci d'avoir regarde",
    "merci de votre attention",
    "abonnez-vous",
    "n'oubliez pas de vous abonner",
    "thanks for watching",
    "thank you for watching",
    "please subscribe",
    "subtitles by",
    "amara.org",
)
"""Whisper's classic inventions on silence and noise (it was trained on subtitled video)."""

NO_SPEECH_PROB = 0.6
LOGPROB_IF_NO_SPEECH = -1.0
"""Whisper's own silence rule: no_speech_prob above 0.6 *and* a low log-probability."""


def normalize(text: str) -> str:
    """Lower case, typographic apostrophes straightened, spaces collapsed."""
    text = unicodedata.normalize("NFC", text).lower().replace("’", "'").replace("`", "'")
    return re.sub(r"\s+", " ", text).strip()


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Word edits (substitutions, insertions, deletions) per reference word, punctuation aside.

    What the smokes judge a transcript by; 0 is perfect, above 1 is possible.
    """
    ref = re.sub(r"[^\w' ]", " ", normalize(reference).replace("-", " ")).split()
    hyp = re.sub(r"[^\w' ]", " ", normalize(hypothesis).replace("-", " ")).split()
    if not ref:
        return float(bool(hyp))
    previous = list(range(len(hyp) + 1))
    for i, word in enumerate(ref, 1):
        current = [i]
        for j, other in enumerate(hyp, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (word != other)))
        previous = current
    return previous[-1] / len(ref)


def is_hallucination(text: str, no_speech_prob: float = 0.0, avg_logprob: float = 0.0) -> bool:
    """True for a segment that is noise dressed up as text."""
    clean = normalize(text)
    if not re.search(r"\w", clean):
        return True  # "...", "♪", "!"
    if no_speech_prob > NO_SPEECH_PROB and avg_logprob < LOGPROB_IF_NO_SPEECH:
        return True
    return any(phrase in clean for phrase in HALLUCINATED_PHRASES)


def _word_key(word: str) -> str:
    return re.sub(r"[^\w']", "", word.lower())


def collapse_repetitions(text: str, max_n: int = 4, keep: int = 1) -> str:
    """Cut Whisper's loops ("de de de de…", "ma paie, ma paie, ma paie…") down to ``keep`` copies.

    A phrase of up to ``max_n`` words repeated three times or more in a row is
    a decoding loop, never speech a user said to a voice assistant; twice is
    left alone ("très très").
    """
    words = text.split()
    keys = [_word_key(w) for w in words]
    for n in range(1, max_n + 1):
        i = 0
        while i + n <= len(words):
            gram = keys[i : i + n]
            if not any(gram):
                i += 1
                continue
            repeats = 1
            while keys[i + repeats * n : i + (repeats + 1) * n] == gram:
                repeats += 1
            if repeats >= 3:
                cut_from, cut_to = i + keep * n, i + repeats * n
                del words[cut_from:cut_to]
                del keys[cut_from:cut_to]
            i += 1
    return " ".join(words)


def loop_period(keys: Sequence[str]) -> int:
    """The smallest phrase (≥ 2 words) that the whole text repeats back to back, else 0.

    "X X", "X X X" and "X X X-cut-short" all count: Whisper's loops restart the
    command and stop wherever its token budget ends.
    """
    n = len(keys)
    for period in range(2, n // 2 + 1):
        if keys[period:] == keys[: n - period]:
            return period
    return 0


def collapse_whole_loop(text: str, min_copies: int = 3) -> str:
    """A text that is one phrase said ``min_copies`` times or more, cut to one copy.

    ``collapse_repetitions`` only sees short phrases; a looped command is longer
    ("Bonjour, quelle heure est-il ?" three times). Twice is left alone: a user
    may repeat a short request once, never three times to a voice assistant.
    """
    words = text.split()
    spoken = [i for i, word in enumerate(words) if _word_key(word)]
    keys = [_word_key(words[i]) for i in spoken]
    period = loop_period(keys)
    if not period or len(keys) < min_copies * period:
        return text
    return " ".join(words[: spoken[period]])


def looks_looped(text: str) -> bool:
    """Whisper said it again: the whole text repeats one phrase, or a short phrase runs 3 times."""
    keys = [key for key in map(_word_key, text.split()) if key]
    if loop_period(keys):
        return True
    return collapse_repetitions(text) != text


FULL_WINDOW_FRAMES = 3000
"""Whisper's encoder input: 30 s of 10 ms mel frames."""
DEFAULT_CPU_THREADS = 1
"""CTranslate2 threads of a CPU level without ``options.cpu_threads`` (see ``WhisperEngine.cpu_threads``)."""


@dataclass(frozen=True)
class QualityGate:
    """Rejects a result the next level of the chain should redo."""

    min_avg_logprob: float = -2.0
    max_compression_ratio: float = 2.4

    def __call__(self, result: AsrResult) -> str | None:
        if not result.text:
            return None  # an empty transcript is an answer (silence), not garbage
        if result.compression_ratio > self.max_compression_ratio:
            ratio, limit = result.compression_ratio, self.max_compression_ratio
            return f"compression ratio {ratio:.2f} > {limit:g} (repetition)"
        if result.avg_logprob < self.min_avg_logprob:
            return f"average log-probability {result.avg_logprob:.2f} < {self.min_avg_logprob:g}"
        return None


def hotwords(names: Sequence[str], terms: Sequence[str], limit: int = 60) -> str | None:
    """Names first, then terms, deduplicated, capped (Whisper's prompt budget is 224 tokens)."""
    seen: set[str] = set()
    words: list[str] = []
    for item in (*names, *terms):
        clean = " ".join(str(item).split())
        if clean and clean.lower() not in seen:
            seen.add(clean.lower())
            words.append(clean)
        if len(words) >= limit:
            break
    return ", ".join(words) if words else None


# --- faster-whisper ------------------------------------------------------------------


class WhisperEngine:
    """faster-whisper (CTranslate2) on ``cpu`` or ``cuda:0``.

    One model per engine; decodes run in a worker thread under a threading
    lock (a decode whose caller was cancelled still runs to its end and must
    not overlap the next one) behind an asyncio lock (waiters queue on the
    event loop, not in the thread pool).
    """

    def __init__(
        self,
        model_dir: Path,
        *,
        model_name: str,
        device: str = "cpu",
        compute_type: str = "",
        languages: Sequence[str] = (),
        quality: int = 0,
        options: dict[str, Any] | None = None,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.model_name = model_name
        self.device = device
        if not compute_type:
            compute_type = "int8" if device == "cpu" else "float16"
        self.compute_type = compute_type
        self.languages = tuple(languages)
        self.quality = quality
        self.name = f"faster-whisper:{model_name}@{device}"
        self.options = dict(options or {})
        self._model: Any = None
        self.window_retries = 0
        """Short-window decodes that looked looped and were redone with 30 s (logs, tests)."""
        self._thread_lock = threading.Lock()
        self._lock = asyncio.Lock()

    async def load(self) -> None:
        if self._model is not None:
            return
        self._model = await asyncio.to_thread(self._load)

    def _load(self) -> Any:
        from faster_whisper import WhisperModel

        device = "cuda" if self.device.startswith("cuda") else "cpu"
        kwargs: dict[str, Any] = {"device": device, "compute_type": self.compute_type}
        if device == "cuda":
            kwargs["device_index"] = 0
        kwargs["cpu_threads"] = self.cpu_threads
        model = WhisperModel(str(self.model_dir), **kwargs)
        full_encode = model.encode

        def encode(features: Any) -> Any:
            # faster-whisper always pads the mel features to 30 s (3000 frames);
            # CTranslate2 accepts fewer. See ``encoder_window_s``.
            return full_encode(features[..., : self._encoder_frames])

        model.encode = encode
        return model

    @property
    def cpu_threads(self) -> int:
        """CTranslate2's threads for one decode (option ``cpu_threads``); 0: its own default.

        One by default on the CPU: a short command is decoder-bound, dozens of small
        steps that two threads only slow down by synchronizing (2-core VM, whisper-base
        int8, beam 5: 165 ms per 2 s French command with one thread, 274 ms with
        CTranslate2's default; 8 s: 1.27 vs 1.40 s; ``bench/asr_bench.py
        --cpu-threads``). The other core stays free for the VAD, Smart Turn and a voice
        speaking beside it. On a GPU the threads only feed it: CTranslate2 decides.
        """
        value = self.options.get("cpu_threads")
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
        return DEFAULT_CPU_THREADS if self.device == "cpu" else 0

    @property
    def encoder_window_s(self) -> float:
        """Encoder window for short commands, in seconds; 0: always Whisper's 30 s.

        Whisper encodes 30 s of audio whatever the length of the command: on a
        CPU that is ~0.6 s of a ~0.9 s decode for a 2 s command. A 10 s window
        gives the same words on our French and English sets (measured: WER 0.52
        vs 0.54 French, 0.09 vs 0.09 English, 3x faster); shorter windows make
        Whisper say the command twice. Used for audio up to half the window;
        a result with signs of a loop is decoded again with the full window.
        """
        value = self.options.get("encoder_window_s", 10.0)
        return float(value) if isinstance(value, int | float) else 10.0

    async def close(self) -> None:
        async with self._lock:
            self._model = None

    async def transcribe(self, request: AsrRequest, cancel: threading.Event | None = None) -> AsrResult:
        if self.languages and request.language not in self.languages:
            raise EngineError(f"{self.model_name} does not speak {request.language!r}")
        async with engine_turn(self._lock):
            if cancel is not None and cancel.is_set():
                raise DecodeCancelled("dropped before it started")
            model = self._model
            if model is None:
                raise EngineError(f"{self.name} is not loaded")
            # On cancellation the decode stops at its next segment (``cancel``); until
            # then it still holds the model, so the lock is kept until it has ended.
            return await until_done(asyncio.to_thread(self._transcribe, model, request, cancel))

    _encoder_frames = FULL_WINDOW_FRAMES

    def _transcribe(self, model: Any, request: AsrRequest, cancel: threading.Event | None) -> AsrResult:
        started = time.monotonic()
        window = self.encoder_window_s
        with self._thread_lock:
            if 0 < window < 30 and request.seconds <= window / 2:
                self._encoder_frames = int(window * 100)
                try:
                    result = self._decode(model, request, cancel)
                finally:
                    self._encoder_frames = FULL_WINDOW_FRAMES
                if not looks_looped(result.text) and result.compression_ratio <= 2.4:
                    return self.finish(replace(result, decode_seconds=time.monotonic() - started))
                self.window_retries += 1
                _LOGGER.info(
                    "%s: %r looks looped with a %g s window; full window", self.name, result.text, window
                )
            result = self._decode(model, request, cancel)
        return self.finish(replace(result, decode_seconds=time.monotonic() - started))

    def _decode(self, model: Any, request: AsrRequest, cancel: threading.Event | None) -> AsrResult:
        if cancel is not None and cancel.is_set():
            raise DecodeCancelled("dropped before it started")
        kwargs: dict[str, Any] = {
            # One beam-search pass. faster-whisper's default re-decodes up to five
            # more times at rising temperatures when the log-probability is low: on a
            # short command that multiplies the latency and samples nothing better.
            # Garbage goes to the quality gate (next level), loops to
            # collapse_repetitions. A level may restore the ladder with
            # ``options: {temperature: [0.0, 0.2, 0.4]}``.
            "temperature": self.options.get("temperature", 0.0),
            "no_speech_threshold": NO_SPEECH_PROB,
            "log_prob_threshold": LOGPROB_IF_NO_SPEECH,
        }
        hints = hotwords(request.names, request.terms)
        if hints:
            kwargs["hotwords"] = hints
        segments, info = model.transcribe(
            request.audio,
            language=request.language or None,
            beam_size=request.beam_size,
            vad_filter=False,  # our Silero stream already gated and trimmed the audio
            condition_on_previous_text=False,
            without_timestamps=True,
            **kwargs,
        )
        kept: list[str] = []
        dropped: list[str] = []
        logprobs: list[float] = []
        ratios: list[float] = []
        no_speech: list[float] = []
        for segment in segments:  # decoding happens while iterating
            if cancel is not None and cancel.is_set():
                raise DecodeCancelled("dropped mid-decode")
            logprobs.append(segment.avg_logprob)
            ratios.append(segment.compression_ratio)
            no_speech.append(segment.no_speech_prob)
            if is_hallucination(segment.text, segment.no_speech_prob, segment.avg_logprob):
                dropped.append(segment.text.strip())
            else:
                kept.append(segment.text.strip())
        if dropped:
            _LOGGER.info("%s: dropped hallucinated segments %r", self.name, dropped)
        text = " ".join(t for t in kept if t)
        return AsrResult(
            text=text,
            language=info.language or request.language,
            engine=self.name,
            avg_logprob=float(np.mean(logprobs)) if logprobs else 0.0,
            compression_ratio=max(ratios) if ratios else 1.0,
            no_speech_prob=max(no_speech) if no_speech else 0.0,
            dropped=tuple(dropped),
        )

    def finish(self, result: AsrResult) -> AsrResult:
        """Last cleanup of a text, whichever window made it."""
        return replace(result, text=collapse_repetitions(collapse_whole_loop(result.text)))


# --- remote Wyoming ASR ----------------------------------------------------------------


class RemoteWyomingEngine:
    """Any Wyoming ASR server (``tcp://host:port``): our last resort when local models fail."""

    def __init__(self, uri: str, *, chunk_samples: int = 1024, quality: int = 0) -> None:
        parsed = urlparse(uri)
        if parsed.scheme != "tcp" or not parsed.hostname or not parsed.port:
            raise ValueError(f"remote ASR must be tcp://host:port, not {uri!r}")
        self.uri = uri
        self.host = parsed.hostname
        self.port = parsed.port
        self.chunk_samples = chunk_samples
        self.name = f"wyoming:{parsed.hostname}:{parsed.port}"
        self.model_name = uri
        self.device = "remote"
        self.quality = quality
        self.languages: tuple[str, ...] = ()

    async def load(self) -> None:
        """Nothing to load: a remote that is down fails the call, and the breaker learns."""

    async def close(self) -> None:
        """Connections are per request."""

    async def transcribe(self, request: AsrRequest, cancel: threading.Event | None = None) -> AsrResult:
        from wyoming.asr import Transcribe, Transcript
        from wyoming.audio import AudioChunk, AudioStart, AudioStop
        from wyoming.client import AsyncTcpClient
        from wyoming.error import Error

        started = time.monotonic()
        pcm = to_pcm16(request.audio)
        step = self.chunk_samples * 2
        try:
            async with AsyncTcpClient(self.host, self.port) as client:
                await client.write_event(
                    Transcribe(
                        language=request.language or None,
                        transcript_names=list(request.names) or None,
                        transcript_terms=list(request.terms) or None,
                    ).event()
                )
                await client.write_event(AudioStart(rate=TARGET_RATE, width=2, channels=1).event())
                for offset in range(0, len(pcm), step):
                    if cancel is not None and cancel.is_set():
                        raise DecodeCancelled("dropped while sending")
                    chunk = AudioChunk(
                        rate=TARGET_RATE, width=2, channels=1, audio=pcm[offset : offset + step]
                    )
                    await client.write_event(chunk.event())
                await client.write_event(AudioStop().event())
                while True:
                    event = await client.read_event()
                    if event is None:
                        raise EngineError(f"{self.name} closed the connection without a transcript")
                    if Transcript.is_type(event.type):
                        transcript = Transcript.from_event(event)
                        text = transcript.text or ""
                        break
                    if Error.is_type(event.type):
                        error = Error.from_event(event)
                        raise EngineError(f"{self.name}: {error.code}: {error.text}")
        except OSError as error:
            raise EngineError(f"{self.name} unreachable: {error}") from error
        if is_hallucination(text) and text.strip():
            _LOGGER.info("%s: dropped hallucinated text %r", self.name, text)
            text = ""
        return AsrResult(
            text=text.strip(),
            language=transcript.language or request.language,
            engine=self.name,
            decode_seconds=time.monotonic() - started,
        )
