"""Semantic endpointing: is what was said so far a whole turn?

With server endpointing (``asr.endpointing_s > 0``) and ``asr.endpointing:
semantic``, the handler asks the :class:`TurnJudge` at each short VAD pause,
once the speculative transcript of that pause is known. Complete: the
transcript goes out at once, instead of after ``endpointing_s`` of silence.
Not complete: the fixed endpoint still ends the utterance.

Two kinds of evidence, because each alone fails where the other does not:

* the audio: Pipecat's Smart Turn v3.2 (BSD-2, ~8M parameters, ONNX; Whisper
  log-mel features of the last 8 s) gives the probability that the speaker has
  finished, from prosody and words together. On its own it cannot know that
  "Allume la lumière" is a valid Home Assistant command;
* the text: a trailing word that cannot end a French or English sentence
  ("de", "la", "the", "and"...), or Whisper's "..." means not finished; a
  transcript that fully matches one of Home Assistant's own sentence templates
  (``hassil`` + ``home-assistant-intents``) is a complete command. Text alone
  is weak on short answers ("Oui."), which match no template.

The model runs where the other native engines run (a supervised worker with
``server.engine_workers``); its features are computed here with numpy, exactly
as Pipecat's vendored copy of Whisper's feature extractor does.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import json
import logging
import re
import threading
import time
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from difflib import SequenceMatcher
from typing import Any, Protocol

import numpy as np

_LOGGER = logging.getLogger(__name__)

SMART_TURN_REF = "smart-turn-v3.2"
"""The catalog ref (config/models.yaml) of the end-of-turn model."""
SAMPLE_RATE = 16000
WINDOW_SAMPLES = 8 * SAMPLE_RATE
"""Smart Turn reads the last 8 s; shorter audio is zero-padded in front."""
PRE_SPEECH_S = 0.5
"""Audio kept before the first speech frame, as Pipecat feeds its analyzer."""
MIN_AVG_LOGPROB = -0.7
"""Below this average token log-probability of the speculative transcript the words are
a guess (whisper-base on espeak-ng's French: -0.8 to -1.5 for garbled readings, -0.1 to
-0.5 for right ones, bench/endpointing_bench.py): the judge then waits for the fixed endpoint."""
COMMAND_THRESHOLD = 0.2
"""Smart Turn probability enough to end a transcript that is a whole Home Assistant command."""
N_FFT = 400
HOP_LENGTH = 160
N_MELS = 80


# --- features ------------------------------------------------------------------------------


def _hz_to_mel(freq: np.ndarray) -> np.ndarray:
    """Slaney mel scale (Whisper's, librosa's default)."""
    freq = np.atleast_1d(np.asarray(freq, dtype=np.float64))
    mels = 3.0 * freq / 200.0
    log_region = freq >= 1000.0
    mels[log_region] = 15.0 + np.log(freq[log_region] / 1000.0) * (27.0 / np.log(6.4))
    return mels


def _mel_to_hz(mels: np.ndarray) -> np.ndarray:
    mels = np.atleast_1d(np.asarray(mels, dtype=np.float64))
    freq = 200.0 * mels / 3.0
    log_region = mels >= 15.0
    freq[log_region] = 1000.0 * np.exp(np.log(6.4) / 27.0 * (mels[log_region] - 15.0))
    return freq


def _mel_filters() -> np.ndarray:
    """Slaney-normalized triangular filters, shape ``(N_FFT // 2 + 1, N_MELS)``."""
    bins = N_FFT // 2 + 1
    edges = _mel_to_hz(
        np.linspace(_hz_to_mel(np.array([0.0]))[0], _hz_to_mel(np.array([8000.0]))[0], N_MELS + 2)
    )
    fft_freqs = np.linspace(0, SAMPLE_RATE // 2, bins)
    slopes = edges[np.newaxis, :] - fft_freqs[:, np.newaxis]
    widths = np.diff(edges)
    down = -slopes[:, :-2] / widths[:-1]
    up = slopes[:, 2:] / widths[1:]
    filters = np.maximum(0.0, np.minimum(down, up))
    return filters * (2.0 / (edges[2 : N_MELS + 2] - edges[:N_MELS]))[np.newaxis, :]


_MEL_FILTERS = _mel_filters()
_HANN = np.hanning(N_FFT + 1)[:-1]  # periodic, as torch.hann_window


def last_window(audio: np.ndarray) -> np.ndarray:
    """The last 8 s of 16 kHz float audio, zero-padded in front when shorter."""
    audio = np.asarray(audio, dtype=np.float32)
    if len(audio) >= WINDOW_SAMPLES:
        return audio[-WINDOW_SAMPLES:]
    return np.concatenate([np.zeros(WINDOW_SAMPLES - len(audio), np.float32), audio])


def log_mel_features(window: np.ndarray) -> np.ndarray:
    """Whisper log-mel features ``(80, 800)`` of an 8 s window, as Smart Turn was trained on.

    Same math as ``transformers.WhisperFeatureExtractor(chunk_length=8)`` with
    ``do_normalize=True`` (Pipecat vendors it in ``_whisper_features.py``):
    zero-mean unit-variance waveform, centered reflect-padded STFT, power, mel,
    log10 clamped 8 decades under the maximum, scaled to about [-1, 1].
    """
    x = np.asarray(window, dtype=np.float32)
    if x.ndim != 1:
        raise ValueError(f"expected mono audio, got shape {x.shape}")
    x = np.pad(x, (0, max(0, WINDOW_SAMPLES - len(x))))[:WINDOW_SAMPLES]
    x = (x - x.mean()) / np.sqrt(x.var() + 1e-7)
    padded = np.pad(x.astype(np.float64), (N_FFT // 2, N_FFT // 2), mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP_LENGTH]
    power = np.abs(np.fft.rfft(frames * _HANN, axis=-1)) ** 2
    mel = np.maximum(1e-10, _MEL_FILTERS.T @ power.T)
    log_spec = np.log10(mel)[:, :-1]
    log_spec = np.maximum(log_spec, log_spec.max() - 8.0)
    return ((log_spec + 4.0) / 4.0).astype(np.float32)


# --- the model -----------------------------------------------------------------------------


class SmartTurnModel:
    """Smart Turn v3.2 as an engine: 16 kHz audio in, probability that the turn is over out.

    Stateless, so it can live in a supervised worker (``runtime.worker``):
    ``probability`` is its one call. One ONNX Runtime thread: a prediction
    takes about 20 ms on this CPU (``bench/endpointing_bench.py`` measures it)
    and must not take cores from a Whisper decode running beside it.
    """

    name = "smart-turn-v3.2"
    device = "cpu"
    quality = 0

    def __init__(self, model_path: str, threads: int = 1) -> None:
        self.model_path = model_path
        self.threads = threads
        self._session: Any = None
        self._lock = threading.Lock()

    async def load(self) -> None:
        if self._session is None:
            await asyncio.to_thread(self.open)

    def open(self) -> None:
        import onnxruntime

        with self._lock:
            if self._session is not None:
                return
            options = onnxruntime.SessionOptions()
            options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
            options.inter_op_num_threads = 1
            options.intra_op_num_threads = self.threads
            options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
            self._session = onnxruntime.InferenceSession(
                self.model_path, sess_options=options, providers=["CPUExecutionProvider"]
            )

    async def close(self) -> None:
        self._session = None

    async def probability(self, audio: np.ndarray) -> float:
        """Off the event loop (ONNX Runtime releases the GIL)."""
        return await asyncio.to_thread(self.probability_blocking, audio)

    def probability_blocking(self, audio: np.ndarray) -> float:
        if self._session is None:
            self.open()
        features = log_mel_features(last_window(audio))[np.newaxis, :, :]
        with self._lock:
            outputs = self._session.run(None, {"input_features": features})
        return float(np.asarray(outputs[0]).reshape(-1)[0])


class ProbabilityModel(Protocol):
    """What the judge needs of the model (in process or a worker proxy)."""

    async def load(self) -> None: ...

    async def close(self) -> None: ...

    async def probability(self, audio: np.ndarray) -> float: ...


# --- text cues -----------------------------------------------------------------------------


class TextCue(enum.Enum):
    INCOMPLETE = "incomplete"
    """The words cannot end here (a trailing article, preposition, conjunction; "...")."""
    COMMAND = "command"
    """A whole Home Assistant command (one of its sentence templates matches all of it)."""
    NEUTRAL = "neutral"
    """Nothing either way: the audio decides."""
    UNSURE = "unsure"
    """Whisper itself doubts the words (average log-probability under :data:`MIN_AVG_LOGPROB`):
    what they say about the end of the sentence cannot be trusted, so the turn is not cut."""


_FRENCH_DANGLING = """
    de du des d la le les l une au aux à et ou mais ni car que qu sur sous dans par pour
    sans vers chez avec mon ma mes ton ta tes sa ses notre nos votre vos ce cet cette ces
    quel quelle quels quelles je j me m te t se s ne n lorsque jusqu très
"""
_ENGLISH_DANGLING = """
    the a an of to and or but nor my your its our their if than into onto until unless very
    for in at with from about
"""
DANGLING_WORDS: dict[str, frozenset[str]] = {
    "fr": frozenset(_FRENCH_DANGLING.split()),
    "en": frozenset(_ENGLISH_DANGLING.split()),
}
"""Words after which no French / English sentence ends. Only words that rarely close a
command: "où", "qui", "quand", "si", "on", "you" can ("Tu vas où ?", "Turn it on"),
and a pronoun after an imperative's hyphen ("Éteins-la", "Fais-le") is not an article."""

_TOKEN_RE = re.compile(r"[\w'’-]+", re.UNICODE)


def trailing_cue(text: str, language: str) -> TextCue:
    """INCOMPLETE when the transcript visibly stops mid-sentence; NEUTRAL otherwise.

    Pure and instant: the punctuation Whisper wrote ("...", a trailing comma or
    hyphen) and the last word against :data:`DANGLING_WORDS`.
    """
    stripped = text.strip()
    if not stripped:
        return TextCue.INCOMPLETE
    if stripped.endswith(("...", "…", ",", "-", ";", ":", "*")):
        return TextCue.INCOMPLETE  # "*": Whisper masks a word it heard cut off ("ferme la p***")
    tokens = _TOKEN_RE.findall(unicodedata.normalize("NFC", stripped).lower())
    if not tokens:
        return TextCue.INCOMPLETE
    last = tokens[-1].strip("-'’")
    if "-" in last:
        return TextCue.NEUTRAL  # "éteins-la", "allume-le": an imperative's pronoun, the sentence can end
    last = re.split(r"['’]", last)[-1]  # "jusqu'", "d'", "l'" stay themselves; "qu'il" → "il"
    dangling = DANGLING_WORDS.get(language.split("-")[0].lower(), frozenset())
    return TextCue.INCOMPLETE if last in dangling else TextCue.NEUTRAL


GLUED_SUFFIXES: dict[str, tuple[str, ...]] = {
    "fr": ("de", "du", "des", "pour", "dans", "sur", "avec"),
}
"""Dangling words whisper-base glues onto the word before when the speaker pauses after them
("Mets un minuteur de…" heard "minuteurde"). Only those no French word is inflected with:
"-le", "-la", "-es" end ordinary words ("actuelle", "quelle", "grandes")."""
MIN_GLUED_STEM = 5


@functools.lru_cache(maxsize=8)
def command_vocabulary(language: str) -> frozenset[str]:
    """The words of Home Assistant's sentence templates and lists for ``language`` (about 800
    in French, read in 10 ms from ``home-assistant-intents``): the words commands are made of."""
    try:
        from home_assistant_intents import get_intents

        data = get_intents(language)
    except Exception:  # no templates for the language, or the package is missing: no vocabulary
        return frozenset()
    if not data:
        return frozenset()
    text = unicodedata.normalize("NFC", json.dumps(data, ensure_ascii=False).lower())
    return frozenset(re.findall(r"[^\W\d_]{2,}", text))


def glued_dangling_word(text: str, language: str, names: Sequence[str] = ()) -> bool:
    """True when the last word is a command word or a name's word with a dangling word glued on.

    Whisper-base writes a trailing "de" cut off by a pause into the word before it:
    "minuteurde" is "minuteur" + "de", and the speaker was still on the sentence. Only a
    word neither in the templates nor in the names, whose stem (5+ letters) is, counts.
    """
    base = language.split("-")[0].lower()
    suffixes = GLUED_SUFFIXES.get(base)
    words = _words(text)
    if not suffixes or not words:
        return False
    last = words[-1]
    vocabulary = command_vocabulary(base)
    name_words = {w for name in names for w in _words(name)}
    if last in vocabulary or last in name_words:
        return False
    stems = (last[: -len(s)] for s in suffixes if last.endswith(s) and len(last) - len(s) >= MIN_GLUED_STEM)
    return any(stem in vocabulary or stem in name_words for stem in stems)


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", unicodedata.normalize("NFC", text).lower())


def _sounds_like(heard: tuple[str, ...], said: Sequence[str]) -> bool:
    """Word by word the same, or within :data:`NAME_SIMILARITY` for words of 4+ letters:
    whisper-base glues an elision on at a pause ("l'alumière" for "la lumière")."""
    return len(heard) == len(said) and all(
        a == b or (min(len(a), len(b)) >= 4 and SequenceMatcher(None, a, b).ratio() >= NAME_SIMILARITY)
        for a, b in zip(heard, said, strict=True)
    )


NAME_SIMILARITY = 0.8


def inside_a_name(text: str, names: Sequence[str]) -> bool:
    """True when the transcript stops inside one of the home's names.

    "Allume la lumière" with a lamp named "lumière du salon" and nothing named
    "lumière": its last words are the start of a longer name and end no name,
    so the speaker was probably still saying it ("… du salon").
    """
    words = _words(text)
    if not words or not names:
        return False
    named = [_words(name) for name in names]
    whole = {tuple(n) for n in named if n}
    longest = max((len(n) for n in named), default=0)
    starts_a_longer_name = False
    for size in range(1, min(len(words), longest) + 1):
        tail = tuple(words[-size:])
        if tail in whole:
            return False  # the last words are a whole name: the sentence can end here
        if any(len(n) > size and _sounds_like(tail, n[:size]) for n in named):
            starts_a_longer_name = True
    return starts_a_longer_name


class TemplateMatcher(Protocol):
    """``handle.intents.IntentRecognizer``'s shape: a full match of a sentence template, or None."""

    def recognize(self, text: str, language: str) -> Any: ...

    def supports(self, language: str) -> bool: ...


# --- the judge -----------------------------------------------------------------------------


@dataclass(frozen=True)
class TurnVerdict:
    """One decision at a pause, with what it rested on (logs, metrics, the benchmark)."""

    complete: bool
    reason: str
    """``audio`` (the model alone), ``template`` (a template match backed by the audio),
    ``text`` (the words cannot end here), ``unsure`` (Whisper doubts the words),
    ``error`` (the model failed: wait)."""
    probability: float | None
    cue: TextCue
    seconds: float
    """Time the verdict took, model and text together."""


class TurnJudge:
    """Audio and text together decide whether the turn is over.

    * the text cannot end here, or Whisper doubts it → not complete, whatever the audio says;
    * the model's probability ≥ ``threshold`` → complete;
    * a full template match and probability ≥ ``command_threshold`` → complete:
      a valid command needs less confidence from the prosody;
    * otherwise not complete: the fixed endpoint will end it.
    """

    def __init__(
        self,
        model: ProbabilityModel,
        *,
        threshold: float = 0.5,
        command_threshold: float = COMMAND_THRESHOLD,
        templates: TemplateMatcher | None = None,
    ) -> None:
        self.model = model
        self.threshold = threshold
        self.command_threshold = command_threshold
        self.templates = templates

    async def start(self) -> None:
        """Load the model, read the command vocabulary and compile the templates of the usual
        languages (0.2 s each) now."""
        await self.model.load()
        for language in GLUED_SUFFIXES:
            await asyncio.to_thread(command_vocabulary, language)  # 20 ms: not on the first verdict
        if self.templates is not None:
            templates = self.templates
            for language in ("fr", "en"):
                await asyncio.to_thread(templates.supports, language)

    async def close(self) -> None:
        await self.model.close()

    async def audio_probability(self, audio: np.ndarray) -> float:
        return await self.model.probability(np.asarray(audio, dtype=np.float32))

    def text_cue(self, text: str, language: str, names: Sequence[str] = ()) -> TextCue:
        """Trailing words, then the home's names (instant), then the templates."""
        cue = self.quick_cue(text, language, names)
        return cue if cue is TextCue.INCOMPLETE else self.template_cue(text, language)

    @staticmethod
    def quick_cue(text: str, language: str, names: Sequence[str] = ()) -> TextCue:
        """INCOMPLETE from the trailing words, a stop inside a name or a dangling word glued
        onto the last one; NEUTRAL otherwise (µs)."""
        cue = trailing_cue(text, language)
        if cue is TextCue.NEUTRAL and (
            inside_a_name(text, names) or glued_dangling_word(text, language, names)
        ):
            return TextCue.INCOMPLETE
        return cue

    def template_cue(self, text: str, language: str) -> TextCue:
        """COMMAND when a template matches all of ``text``. A sentence no template matches
        costs hassil ~140 ms with wildcard slots (measured): call it in a thread, and only
        when the answer can change the verdict."""
        if self.templates is None:
            return TextCue.NEUTRAL
        try:
            match = self.templates.recognize(text.strip().rstrip(".!?"), language.split("-")[0])
        except Exception:  # a template engine failure must not end or hold a turn
            _LOGGER.debug("turn: template match failed for %r", text, exc_info=True)
            return TextCue.NEUTRAL
        return TextCue.COMMAND if match is not None else TextCue.NEUTRAL

    def decide(self, probability: float | None, cue: TextCue) -> tuple[bool, str]:
        """The combination rule, pure (unit-tested on its own)."""
        if cue is TextCue.INCOMPLETE:
            return False, "text"
        if cue is TextCue.UNSURE:
            return False, "unsure"
        if probability is None:
            return False, "error"
        if probability >= self.threshold:
            return True, "audio"
        if cue is TextCue.COMMAND and probability >= self.command_threshold:
            return True, "template"
        return False, "audio"

    async def judge(
        self,
        text: str,
        language: str,
        *,
        audio: np.ndarray | None = None,
        probability: asyncio.Future[float] | None = None,
        names: Sequence[str] = (),
        avg_logprob: float = 0.0,
    ) -> TurnVerdict:
        """Verdict on ``text`` and either ``audio`` or a ``probability`` already being computed;
        ``names``: the home's entity and area names (the client's and Home Assistant's);
        ``avg_logprob``: Whisper's confidence in ``text``."""
        started = time.monotonic()
        cue = TextCue.UNSURE if avg_logprob < MIN_AVG_LOGPROB else self.quick_cue(text, language, names)
        if cue is TextCue.INCOMPLETE and text.rstrip().endswith(","):
            cue = await self._comma_after_a_command(text, language, names)
        value: float | None = None
        # The words alone may decide (INCOMPLETE, UNSURE); a probability already being computed is
        # still read, for the verdict's record (logs, the endpointing bench): it costs no extra time.
        if cue not in (TextCue.INCOMPLETE, TextCue.UNSURE) or probability is not None:
            try:
                if probability is not None:
                    value = await probability
                elif audio is not None:
                    value = await self.audio_probability(audio)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # the worker crashed or the model is missing: wait
                _LOGGER.warning("turn: end-of-turn model failed (%s): the fixed endpoint decides", error)
        if cue is TextCue.NEUTRAL and value is not None and self.command_threshold <= value < self.threshold:
            cue = await asyncio.to_thread(self.template_cue, text, language)  # only here can it matter
        complete, reason = self.decide(value, cue)
        return TurnVerdict(complete, reason, value, cue, time.monotonic() - started)

    async def _comma_after_a_command(self, text: str, language: str, names: Sequence[str]) -> TextCue:
        """COMMAND when the words before a trailing comma are a whole Home Assistant command, else
        INCOMPLETE. whisper-base often ends a finished command with a comma at a short pause
        ("allume la lumière du salon,": 2 of 15 complete commands in the endpointing bench,
        2026-12-07), and the comma alone made them wait for the fixed endpoint; a template match
        says the command is whole, so the audio decides as for any command."""
        words = text.rstrip().rstrip(",")
        if not words or self.quick_cue(words, language, names) is TextCue.INCOMPLETE:
            return TextCue.INCOMPLETE
        cue = await asyncio.to_thread(self.template_cue, words, language)
        return TextCue.COMMAND if cue is TextCue.COMMAND else TextCue.INCOMPLETE


def build_turn_judge(context: Any) -> TurnJudge | None:
    """The service's judge, or None when the server does not end utterances semantically.

    Semantic endpointing needs server endpointing (``asr.endpointing_s > 0``):
    otherwise the client (Home Assistant) sends ``audio-stop`` itself. A
    missing model falls back to the fixed endpoint, loudly.
    """
    from ..handle.intents import IntentRecognizer
    from ..runtime.registry import RegistryError
    from ..runtime.worker import supervised, worker_options

    settings = context.settings.asr
    if settings.endpointing != "semantic" or settings.endpointing_s <= 0:
        return None
    try:
        resolved = context.registry.resolve(SMART_TURN_REF)
    except RegistryError as error:
        _LOGGER.warning(
            "asr.endpointing: semantic, but %s (fetch it: superwhisper models fetch %s); "
            "utterances end after asr.endpointing_s of silence",
            error,
            SMART_TURN_REF,
        )
        return None
    model = supervised(
        worker_options(context.settings), SmartTurnModel, str(resolved.entry_path), calls=("probability",)
    )
    if hasattr(model, "watch_crashes"):
        metrics = context.metrics
        model.watch_crashes(lambda cause: metrics.on_crash("asr", SMART_TURN_REF, "turn", cause))
    return TurnJudge(model, threshold=settings.turn_threshold, templates=IntentRecognizer())
