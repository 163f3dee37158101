"""The ASR service: its chain of engines, the shared VAD, the decode queue, ``describe``.

One :class:`AsrService` per process serves every connection. It owns what is
shared (engines behind a :class:`FallbackChain`, the Silero session, the
bounded decode queue, the Home Assistant name cache) and answers ``describe``
from data computed once, so that answer never waits for a decode. Handlers
(one per connection, in ``handler.py``) own the per-utterance state.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import subprocess
import threading
import time
import wave
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from wyoming.info import AsrModel, AsrProgram, Attribution, Info

from .. import __version__
from ..audio import TARGET_RATE, AudioConverter
from ..config import AsrSettings
from ..runtime.chains import plan_chain
from ..runtime.fallback import ChainResult, EngineError, FallbackChain
from ..runtime.server import Connection, EventHandler, ServiceContext, WyomingService
from ..runtime.worker import supervised, worker_options
from .engines import (
    AsrEngine,
    AsrRequest,
    AsrResult,
    DecodeCancelled,
    QualityGate,
    RemoteWyomingEngine,
    WhisperEngine,
    word_error_rate,
)
from .hass import HassNames
from .numbers import to_digits
from .turn import TurnJudge, build_turn_judge
from .vad import SileroVad

_LOGGER = logging.getLogger(__name__)

PROGRAM_ATTRIBUTION = Attribution(name="wyoming-superwhisper", url="https://github.com/wyoming-superwhisper")


class QueueFull(Exception):
    """``asr.queue_size`` transcriptions are already waiting: answer ``busy``."""


@dataclass(frozen=True)
class Decoded:
    """A chain answer as the handler needs it."""

    result: AsrResult
    level: int
    engine: str
    fell_back: bool


def build_engines(context: ServiceContext) -> tuple[list[AsrEngine], list[AsrModel]]:
    """Engines for the planned levels, and the models ``describe`` lists (missing ones too)."""
    settings = context.settings.asr
    plan = plan_chain("asr.chain", settings.chain, context.registry, context.gpu)
    workers = worker_options(context.settings)
    engines: list[AsrEngine] = []
    models: dict[str, AsrModel] = {}
    for level in plan.levels:
        if level.model is None:
            engines.append(RemoteWyomingEngine(level.level.remote))
            models.setdefault(
                level.level.remote,
                AsrModel(
                    name=level.level.remote,
                    attribution=Attribution(name="remote Wyoming server", url=level.level.remote),
                    installed=True,
                    description="remote Wyoming speech-to-text server",
                    version=None,
                    languages=[],
                ),
            )
            continue
        spec = level.model.spec
        options = {**dict(spec.options), **dict(level.level.options)}
        options.pop("compute_type", None)
        # The level's own compute_type wins; the catalog's is a CPU default, so a GPU
        # level takes float16 (CTranslate2's fast path on CUDA) and a CPU level int8.
        compute_type = str(level.level.options.get("compute_type") or "")
        if not compute_type:
            compute_type = "float16" if level.device.startswith("cuda") else "int8"
        engines.append(
            supervised(
                workers,
                WhisperEngine,
                level.model.entry_path,
                calls=("transcribe",),
                model_name=spec.ref,
                device=level.device,
                compute_type=compute_type,
                languages=spec.languages,
                quality=spec.quality,
                options=options,
            )
        )
        models.setdefault(spec.ref, _model_info(spec, installed=True))
    for skipped in plan.skipped:
        if skipped.level.model and skipped.degraded and skipped.level.model not in models:
            try:
                spec = context.registry.spec(skipped.level.model)
            except Exception:  # the plan already judged it; describe must not fail
                continue
            models[spec.ref] = _model_info(spec, installed=False)
        _LOGGER.info("asr: level %s skipped: %s", skipped.key, skipped.reason)
    return engines, list(models.values())


def _model_info(spec: Any, *, installed: bool) -> AsrModel:
    return AsrModel(
        name=spec.ref,
        attribution=Attribution(name=spec.attribution.name, url=spec.attribution.url),
        installed=installed,
        description=spec.description or None,
        version=spec.version or None,
        languages=list(spec.languages),
    )


class AsrService(WyomingService):
    """Wyoming speech-to-text: streaming VAD, speculative decode, fallback chain."""

    name = "asr"

    def __init__(
        self,
        context: ServiceContext,
        *,
        engines: Sequence[AsrEngine] | None = None,
        models: Sequence[AsrModel] | None = None,
    ) -> None:
        """``engines``/``models`` replace the planned chain (tests inject faults this way)."""
        super().__init__(context)
        self.settings: AsrSettings = context.settings.asr
        if engines is None:
            planned, planned_models = build_engines(context)
            engines = planned
            models = planned_models if models is None else models
        elif models is None:
            models = [
                AsrModel(
                    name=e.model_name,
                    attribution=PROGRAM_ATTRIBUTION,
                    installed=True,
                    description=None,
                    version=None,
                    languages=list(e.languages),
                )
                for e in engines
            ]
        self.chain: FallbackChain[AsrEngine] = FallbackChain(
            "asr",
            list(engines),
            timeout_s=self.settings.timeout_s,
            failure_threshold=self.settings.failure_threshold,
            cooldown_s=self.settings.cooldown_s,
            observer=context.metrics,
            memory=context.vram,
        )
        self.quality_gate = QualityGate(self.settings.min_avg_logprob, self.settings.max_compression_ratio)
        self.vad = SileroVad(worker_options(context.settings) if self.settings.vad_in_worker else None)
        if self.vad.worker is not None:
            metrics = context.metrics
            self.vad.worker.watch_crashes(lambda cause: metrics.on_crash("asr", "silero-vad", "vad", cause))
        self.turn: TurnJudge | None = build_turn_judge(context)
        """Semantic endpointing's judge (``asr/turn.py``); None: fixed endpoint or none."""
        self.hass = (
            HassNames(
                self.settings.hass_url, self.settings.hass_token, refresh_s=self.settings.hass_refresh_s
            )
            if self.settings.hass_url
            else None
        )
        self.decodes = 0
        """Decodes started (speculative ones included): tests assert on it."""
        self.speculative_hits = 0
        """Final answers that reused a speculative decode."""
        self.speculative_misses = 0
        """Speculative decodes dropped because speech resumed."""
        self._finals_pending = 0
        self._pending = 0
        self._info_event = Info(asr=[self._program(list(models or []))]).event()

    # --- WyomingService --------------------------------------------------------------

    @property
    def uri(self) -> str:
        return self.settings.uri

    def chains(self) -> Sequence[FallbackChain[Any]]:
        return [self.chain]

    def create_handler(self, connection: Connection) -> EventHandler:
        from .handler import AsrHandler

        return AsrHandler(connection, self)

    async def start(self) -> None:
        await self.vad.start()
        if self.turn is not None:
            await self.turn.start()
        if self.hass is not None:
            self.hass.start()
        await super().start()

    async def stop(self) -> None:
        if self.hass is not None:
            await self.hass.stop()
        await super().stop()
        await self.vad.stop()
        if self.turn is not None:
            await self.turn.close()

    def readiness(self) -> tuple[bool, str]:
        ready, reason = super().readiness()
        vad = self.vad.worker_status()
        if ready and vad is not None and vad["state"] != "ready":
            return False, f"asr: VAD worker {vad['state']} (last crash: {vad['last_crash'] or 'none'})"
        return ready, reason

    def status(self) -> dict[str, Any]:
        return {**super().status(), "vad": self.vad.worker_status()}

    async def smoke(self) -> str:
        """Transcribe a sentence spoken by espeak-ng and judge the words (WER bound).

        English when the chain reads it: Whisper base reads espeak-ng's robotic
        French at a WER of 0.3 to 0.5 per sentence (measured), its English at
        0.09, so only English gives a bound that is both tight and stable. The
        doctor judges French through the TTS read-back.
        """
        speaks_en = any(not e.languages or "en" in e.languages for e in self.chain.engines)
        language = "en" if speaks_en else self.settings.language
        text = SMOKE_SENTENCES.get(language, SMOKE_SENTENCES["fr"])
        audio = await asyncio.to_thread(_smoke_audio, text, language)
        if audio is None:  # no espeak-ng: a tone still proves the chain answers
            t = np.arange(TARGET_RATE) / TARGET_RATE
            tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
            decoded = await self.decode(AsrRequest(tone, language, self.settings.beam_size))
            return f"{decoded.engine}: {decoded.result.text!r} (a tone: espeak-ng missing, not judged)"
        heard, error, engine = await self.read_back(audio, text, language)
        if error > SMOKE_MAX_WER:
            raise EngineError(f"{engine} heard {heard!r} for {text!r}: WER {error:.2f} > {SMOKE_MAX_WER:g}")
        return f"{engine} heard {heard!r} (WER {error:.2f} ≤ {SMOKE_MAX_WER:g})"

    async def read_back(self, audio: np.ndarray, text: str, language: str) -> tuple[str, float, str]:
        """What the chain hears in ``audio`` (16 kHz float32), its WER against ``text``, the engine."""
        decoded = await self.decode(AsrRequest(audio, language, self.settings.beam_size))
        expected = to_digits(text, language) if self.settings.numbers == "digits" else text
        return decoded.result.text, word_error_rate(expected, decoded.result.text), decoded.engine

    # --- for handlers ------------------------------------------------------------------

    @property
    def info_event(self) -> Any:
        """The ``info`` answer, built once: ``describe`` never waits for anything."""
        return self._info_event

    def _program(self, models: list[AsrModel]) -> AsrProgram:
        return AsrProgram(
            name="superwhisper-asr",
            attribution=PROGRAM_ATTRIBUTION,
            installed=True,
            description="faster-whisper behind streaming Silero VAD, with speculative decoding",
            version=__version__,
            models=models,
            supports_transcript_streaming=True,
            requires_external_vad=self.settings.endpointing_s <= 0,
        )

    def model_levels(self, name: str | None) -> list[int] | None:
        """Levels to try for a client's ``name``: from the named model down; None: all."""
        if not name:
            return None
        for index, engine in enumerate(self.chain.engines):
            if engine.model_name == name:
                return list(range(index, len(self.chain.levels)))
        return None

    def names_hints(self) -> tuple[str, ...]:
        return self.hass.names if self.hass is not None else ()

    def converter(self, rate: int, width: int, channels: int) -> AudioConverter:
        return AudioConverter(rate, width, channels)

    def can_speculate(self) -> bool:
        """Speculate only when the queue has room: a guess must never delay an answer."""
        return self._pending < self.settings.queue_size + 1

    async def decode(
        self,
        request: AsrRequest,
        *,
        cancel: threading.Event | None = None,
        speculative: bool = False,
        levels: Sequence[int] | None = None,
    ) -> Decoded:
        """Run the chain under the queue bound; raises QueueFull, AllLevelsFailed, cancels."""
        limit = self.settings.queue_size + 1  # one decoding, queue_size waiting
        if not speculative and self._finals_pending >= limit:
            raise QueueFull(f"{self.settings.queue_size} transcriptions already waiting")
        if speculative and self._pending >= limit:
            raise QueueFull("no room for a speculative decode")
        self.decodes += 1
        self._pending += 1
        if not speculative:
            self._finals_pending += 1
        depth = self.context.metrics.queue_depth.labels(self.name)
        depth.inc()
        started = time.monotonic()
        try:

            async def call(engine: AsrEngine) -> AsrResult:
                try:
                    return await engine.transcribe(request, cancel)
                except DecodeCancelled:
                    # A dropped guess is no engine failure: the chain must neither count
                    # it against the engine nor try the next level.
                    raise asyncio.CancelledError from None

            answer: ChainResult[AsrResult] = await self.chain.run(
                call, quality_gate=self.quality_gate, levels=levels
            )
        finally:
            depth.dec()
            self._pending -= 1
            if not speculative:
                self._finals_pending -= 1
        self.context.metrics.observe(self.name, "decode", time.monotonic() - started, answer.level)
        result = answer.value
        if self.settings.numbers == "digits" and result.text:
            # Partial and final transcripts both come from here: the same digits in each.
            result = replace(result, text=to_digits(result.text, result.language or request.language))
        return Decoded(result, answer.level, answer.engine, answer.fell_back)


SMOKE_SENTENCES = {
    "en": "Turn on the kitchen lights please.",
    "fr": "Quelle est la capitale de la France ?",
}
SMOKE_MAX_WER = 0.5
"""Above this word error rate the smoke's transcript is wrong, not just imperfect."""


def _smoke_audio(text: str, voice: str) -> np.ndarray | None:
    """``text`` spoken by espeak-ng at 16 kHz; None without espeak-ng."""
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        return None
    try:
        raw = subprocess.run(
            [espeak, "-v", voice, "--stdout", text], check=True, capture_output=True, timeout=30
        ).stdout
        return _wav_to_16k(raw)
    except (OSError, subprocess.SubprocessError, wave.Error, ValueError):
        _LOGGER.warning("smoke: espeak-ng failed", exc_info=True)
        return None


def _wav_to_16k(raw: bytes) -> np.ndarray:
    """espeak-ng's WAV on stdout has unknown sizes; read the header, take the rest as data."""
    index = raw.find(b"data")
    if raw[:4] != b"RIFF" or index < 0:
        raise ValueError("espeak-ng did not write a WAV")
    fmt = raw.find(b"fmt ")
    channels = int.from_bytes(raw[fmt + 10 : fmt + 12], "little")
    rate = int.from_bytes(raw[fmt + 12 : fmt + 16], "little")
    width = int.from_bytes(raw[fmt + 22 : fmt + 24], "little") // 8
    converter = AudioConverter(rate, width, channels)
    return np.concatenate([converter.convert(raw[index + 8 :]), converter.flush()])
