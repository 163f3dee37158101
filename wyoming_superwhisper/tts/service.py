"""The TTS service: one voice chain per language, built from ``tts.voices``.

Home Assistant never sends a language, so a request is routed by the voice
name if it names one, else by the language it names, else by ``tts.language``
(French by default). A chain only holds voices of its own language, so a
French text is never read by an English voice; when a language has no
installed voice the request gets an ``error`` event rather than a voice that
mangles it.

Every configured voice is loaded at start and stays loaded (a Piper voice is
warmed with one synthesis), so the first request pays no load and a fallback
voice answers as fast as the primary would.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import threading
import wave
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wyoming.info import Attribution, Info, TtsProgram, TtsVoice, TtsVoiceSpeaker

from .. import __version__
from ..config import ConfigError, EngineLevel, TtsSettings, resolve_path
from ..runtime.chains import ChainPlan, PlannedLevel, plan_chain
from ..runtime.fallback import ChainResult, FallbackChain, QualityRejected
from ..runtime.limits import InFlight
from ..runtime.registry import SystemSource, UnknownModel
from ..runtime.server import Connection, EventHandler, ServiceContext, ServiceState, WyomingService
from ..runtime.worker import WorkerOptions, supervised, worker_options
from .engines import (
    CHANNELS,
    SAMPLE_WIDTH,
    Audio,
    EspeakEngine,
    PiperEngine,
    RemoteWyomingEngine,
    SynthesisOptions,
    TtsEngine,
    VoiceInfo,
    check_audio,
    check_duration,
)
from .kokoro import KokoroEngine, packaged_voice
from .sentences import SplitterOptions, normalize, split_sentences

_LOGGER = logging.getLogger(__name__)

SMOKE_SENTENCES = {"fr": "Il est dix heures et demie.", "en": "It is half past ten."}
"""What the smoke says, and what the doctor's ASR read-back expects to hear."""

DEFAULT_RATE = 22050
"""Rate announced for an answer with no audio at all (empty text) when nothing else is known."""

SPLIT_CACHE = ".vits-split"
"""Under the registry's cache directory: Piper voices' graphs cut for chunked decoding
(a dot folder, so the registry's scan of dropped-in models passes it by)."""

PREPARE_PRIORITY = (9.0, 0.0)
"""Where a segment prepared in advance waits for its voice: behind every answer's segments."""

AudioSink = Callable[[Audio, int], Awaitable[None]]
"""Receives a segment's audio as it comes (a piece, the chain level that made it)."""


CacheKey = tuple[str, str, float, str | None]
"""(the voice tried first: language, level and identity; the normalized segment; length scale;
speaker)."""


class SegmentCache:
    """The audio of segments said recently, so a segment said again needs no synthesis.

    An assistant repeats itself: "C'est fait.", "J'ai allumé la lumière du salon.",
    the same greeting. A voice that renders a segment whole (Kokoro: about 0.7 s for
    such a sentence on two cores) is then skipped, and the first audio goes out as soon
    as the text arrives. Least recently used segments go first past ``max_bytes``.
    Only audio from the route's first voice is kept: a fallback's audio is the degraded
    one, and the first voice should answer again once it is back.

    With a ``directory`` (``tts.cache_dir``) every kept segment is also a WAV file there,
    named by a digest of its key, so a restart keeps them; the files are bounded by the
    same size, the least recently said removed first.
    """

    def __init__(self, max_bytes: int, directory: Path | None = None) -> None:
        from cachetools import LRUCache

        self.max_bytes = max_bytes
        self._audio: Any = LRUCache(maxsize=max(max_bytes, 1), getsizeof=lambda audio: len(audio.pcm))
        self.directory = directory if max_bytes > 0 else None
        self._disk = threading.Lock()
        """Files are read and written in threads: one at a time, so the size count stays true."""
        self._disk_bytes = 0
        if self.directory is not None:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                self._disk_bytes = sum(path.stat().st_size for path in self.directory.glob("*.wav"))
                self._trim()
            except OSError as error:
                _LOGGER.warning("tts: segments kept in memory only, %s unusable: %s", self.directory, error)
                self.directory = None

    async def get(self, key: CacheKey, engine: str) -> Audio | None:
        """The kept audio of ``key`` (made by ``engine``), from memory or its file (read in a
        thread); None."""
        if self.max_bytes <= 0:
            return None
        kept: Audio | None = self._audio.get(key)
        if kept is not None or self.directory is None:
            return kept
        read = await asyncio.to_thread(self._read, self._path(key))
        if read is None:
            return None
        audio = Audio(read[1], read[0], engine)
        self._audio[key] = audio
        return audio

    async def put(self, key: CacheKey, audio: Audio) -> None:
        if self.max_bytes <= 0 or len(audio.pcm) > self.max_bytes // 4:
            return  # one long segment must not push every short answer out
        self._audio[key] = audio
        if self.directory is not None:
            await asyncio.to_thread(self._write, self._path(key), audio)

    def _read(self, path: Path) -> tuple[int, bytes] | None:
        """(rate, PCM) of a kept segment's file; None when absent or unreadable (then removed)."""
        with self._disk:
            return self._read_file(path)

    def _read_file(self, path: Path) -> tuple[int, bytes] | None:
        try:
            with wave.open(str(path), "rb") as wav:
                if (wav.getnchannels(), wav.getsampwidth()) != (CHANNELS, SAMPLE_WIDTH):
                    raise wave.Error("not 16-bit mono")
                rate, pcm = wav.getframerate(), wav.readframes(wav.getnframes())
            os.utime(path)  # said again: the last to go
        except FileNotFoundError:
            return None
        except (OSError, wave.Error, EOFError) as error:
            _LOGGER.warning("tts: dropping unreadable kept segment %s: %s", path.name, error)
            self._remove(path)
            return None
        return rate, pcm

    def _write(self, path: Path, audio: Audio) -> None:
        """The segment's WAV file (written aside, then renamed), the directory kept to size."""
        partial = path.with_suffix(".part")
        with self._disk:
            try:
                with wave.open(str(partial), "wb") as wav:
                    wav.setnchannels(CHANNELS)
                    wav.setsampwidth(SAMPLE_WIDTH)
                    wav.setframerate(audio.rate)
                    wav.writeframes(audio.pcm)
                os.replace(partial, path)
                self._disk_bytes += path.stat().st_size
            except OSError as error:
                _LOGGER.warning("tts: cannot keep a segment in %s: %s", self.directory, error)
                return
            if self._disk_bytes > self.max_bytes:
                self._trim()

    def _path(self, key: CacheKey) -> Path:
        assert self.directory is not None
        return self.directory / (hashlib.sha256(repr(key).encode("utf-8")).hexdigest()[:32] + ".wav")

    def _trim(self) -> None:
        """The least recently said files removed until the directory fits ``max_bytes``."""
        assert self.directory is not None
        files = sorted(self.directory.glob("*.wav"), key=lambda path: path.stat().st_mtime)
        self._disk_bytes = sum(path.stat().st_size for path in files)
        for path in files:
            if self._disk_bytes <= self.max_bytes:
                break
            self._remove(path)

    def _remove(self, path: Path) -> None:
        with contextlib.suppress(OSError):
            size = path.stat().st_size
            path.unlink()
            self._disk_bytes -= size


class VoiceError(Exception):
    """The request names a voice or language this server cannot serve; sent as an ``error``."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(message)


def language_key(language: str) -> str:
    """``fr-FR``, ``fr_FR``, ``FR`` → ``fr``: chains are keyed by the primary subtag."""
    return language.strip().replace("_", "-").split("-")[0].lower()


@dataclass(frozen=True)
class Route:
    """Which chain answers a request, and in which order its levels are tried."""

    language: str
    chain: FallbackChain[TtsEngine]
    levels: tuple[int, ...]
    voice: str
    """The voice asked for (or the language's first voice): for logs."""


@dataclass
class _Voice:
    """A configured voice: where it lives in which chain, and what describe says of it."""

    info: VoiceInfo
    language: str
    level: int | None
    """Index in its language's chain; None when the voice is not usable here."""
    engine: TtsEngine | None


def build_engine(
    planned: PlannedLevel,
    settings: TtsSettings,
    workers: WorkerOptions | None = None,
    split_dir: Path | None = None,
) -> TtsEngine:
    """The engine for one planned chain level (a Piper voice in a supervised worker,
    espeak-ng, or a remote server). ``split_dir`` caches Piper graphs cut for chunked
    decoding (``tts.chunked_decode``); None: Piper voices synthesize whole sentences."""
    level = planned.level
    options: dict[str, Any] = {}
    if planned.model is not None:
        options.update(planned.model.spec.options)
    options.update(level.options)
    if planned.model is None:
        return RemoteWyomingEngine(
            uri=level.remote,
            voice=options.get("voice") or None,
            name=voice_name(level),
        )
    model = planned.model
    spec = model.spec
    if spec.kind == "piper":
        speaker = options.get("speaker")
        piper: TtsEngine = supervised(
            workers,
            PiperEngine,
            calls=("synthesize",),
            streams=("synthesize_stream",),
            model_path=model.entry_path,
            name=spec.ref,
            quality=spec.quality,
            device=planned.device,
            speaker=None if speaker is None else str(speaker),
            length_scale=float(options.get("length_scale", 1.0)),
            noise_scale=_optional_float(options, "noise_scale", planned.key),
            noise_w=_optional_float(options, "noise_w", planned.key),
            warm_text="Bonjour." if "fr" in spec.languages else "Hello.",
            chunked=settings.chunked_decode,
            split_dir=split_dir,
        )
        return piper
    if spec.kind == "kokoro":
        kokoro: TtsEngine = supervised(
            workers,
            KokoroEngine,
            calls=("synthesize",),
            model_path=model.entry_path,
            voice_pack=packaged_voice(str(options.get("voice", "ff_siwis"))),
            language=(spec.languages or ("fr",))[0],
            name=spec.ref,
            quality=spec.quality,
            device=planned.device,
            length_scale=float(options.get("length_scale", 1.0)),
            warm_text="Bonjour." if "fr" in spec.languages else "Hello.",
        )
        return kokoro
    if spec.kind == "espeak":
        system_voice = next((s.voice for s in spec.sources if isinstance(s, SystemSource) and s.voice), "")
        voice = str(options.get("voice") or system_voice or (spec.languages or ("fr",))[0])
        return EspeakEngine(
            binary=model.entry_path,
            voice=voice,
            name=spec.ref,
            quality=spec.quality,
            native_rate=int(options.get("sample_rate", 22050)),
        )
    raise ConfigError(planned.key, "configuration", f"{spec.ref} is a {spec.kind} model, not a voice")


def _optional_float(options: dict[str, Any], name: str, key: str) -> float | None:
    """A voice option that is a number ≥ 0, or None when not given (the voice's own value)."""
    value = options.get(name)
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = -1.0
    if number < 0:
        raise ConfigError(f"{key}.options.{name}", "configuration", f"must be a number ≥ 0, not {value!r}")
    return number


def voice_name(level: EngineLevel) -> str:
    """The name a voice has in ``describe`` and in ``synthesize``'s ``voice.name``."""
    if level.model:
        return level.model
    given = level.options.get("name")
    if given:
        return str(given)
    return "wyoming-" + level.remote.removeprefix("tcp://").replace(":", "-")


class TtsService(WyomingService):
    """Wyoming TTS: sentence-by-sentence synthesis through per-language voice chains."""

    name = "tts"

    def __init__(self, context: ServiceContext) -> None:
        super().__init__(context)
        self.smoke_audio: tuple[Audio, str, str] | None = None
        """(audio, text, language) of the last smoke, for the doctor's read-back by the ASR."""
        self.settings = context.settings.tts
        self.default_language = language_key(self.settings.language)
        if self.default_language not in {language_key(k) for k in self.settings.voices}:
            raise ConfigError(
                "tts.language",
                "configuration",
                f"no voices configured for {self.settings.language!r} (tts.voices has "
                f"{', '.join(self.settings.voices) or 'none'})",
            )
        if self.settings.cache_mb < 0:
            raise ConfigError(
                "tts.cache_mb", "configuration", f"must be 0 (off) or more, not {self.settings.cache_mb}"
            )
        directory = (
            resolve_path(context.settings, self.settings.cache_dir) if self.settings.cache_dir else None
        )
        self.cache = SegmentCache(int(self.settings.cache_mb * 1024 * 1024), directory)
        self._voice_ids: dict[int, str] = {}
        """Per engine: what makes its audio what it is (model, version, options), for the cache's keys."""
        self.in_flight = InFlight(self.settings.queue_size)
        """Answers being spoken or waiting (the queue-depth gauge counts segments instead)."""
        self.plans: dict[str, ChainPlan] = {}
        self.routes: dict[str, FallbackChain[TtsEngine]] = {}
        self.voices: dict[str, _Voice] = {}
        shared: dict[tuple[str, str, str], TtsEngine] = {}
        workers = worker_options(context.settings)
        split_dir = context.registry.cache_dir / SPLIT_CACHE
        for raw_language, levels in self.settings.voices.items():
            language = language_key(raw_language)
            plan = plan_chain(f"tts.voices.{raw_language}", levels, context.registry, context.gpu)
            self.plans[language] = plan
            engines: list[TtsEngine] = []
            planned_by_key = {p.key: p for p in plan.levels}
            skipped_by_key = {s.key: s for s in plan.skipped}
            for index, level in enumerate(levels):  # configured order, also in describe
                level_key = f"tts.voices.{raw_language}[{index}]"
                planned = planned_by_key.get(level_key)
                if planned is None:
                    skipped = skipped_by_key.get(level_key)
                    reason = skipped.reason if skipped is not None else "not planned"
                    _LOGGER.warning("tts: %s skipped: %s", level_key, reason)
                    self._add_voice(level, language, None, None, installed=False)
                    continue
                spec = planned.spec
                if spec is not None and spec.languages and language not in spec.languages:
                    # A French text read by an English voice is worse than an error.
                    _LOGGER.warning(
                        "tts: %s (%s) does not speak %r: left out of the %s chain",
                        level_key,
                        spec.ref,
                        language,
                        language,
                    )
                    continue
                key = (voice_name(level), planned.device, repr(sorted(level.options.items())))
                engine = shared.get(key) or build_engine(planned, self.settings, workers, split_dir)
                shared[key] = engine
                model = planned.model
                self._voice_ids[id(engine)] = repr(
                    (
                        __version__,
                        key,
                        model.spec.version if model is not None else "",
                        sorted(model.spec.sha256.items()) if model is not None else [],
                    )
                )
                self._add_voice(level, language, len(engines), engine, installed=True)
                engines.append(engine)
            self.routes[language] = FallbackChain(
                f"tts.{language}",
                engines,
                timeout_s=self.settings.timeout_s,
                failure_threshold=self.settings.failure_threshold,
                cooldown_s=self.settings.cooldown_s,
                observer=context.metrics,
                memory=context.vram,
            )

    def _add_voice(
        self,
        level: EngineLevel,
        language: str,
        index: int | None,
        engine: TtsEngine | None,
        *,
        installed: bool,
    ) -> None:
        name = voice_name(level)
        existing = self.voices.get(name)
        if existing is not None:
            if language not in existing.info.languages:
                info = existing.info
                existing.info = VoiceInfo(
                    info.name,
                    (*info.languages, language),
                    info.description,
                    info.attribution_name,
                    info.attribution_url,
                    info.version,
                    info.installed or installed,
                )
            return
        description, attribution, url, version = name, "", "", None
        languages: tuple[str, ...] = (language,)
        if level.model:
            try:
                spec = self.context.registry.spec(level.model)
            except UnknownModel:  # plan_chain has already refused it; keep describe honest
                spec = None
            if spec is not None:
                description = spec.description or name
                attribution, url = spec.attribution.name, spec.attribution.url
                version = spec.version or None
        else:
            description = f"remote Wyoming TTS at {level.remote}"
            attribution, url = "remote server", level.remote
        self.voices[name] = _Voice(
            VoiceInfo(name, languages, description, attribution, url, version, installed),
            language,
            index,
            engine,
        )

    # -- WyomingService --------------------------------------------------------------

    @property
    def uri(self) -> str:
        return self.settings.uri

    def chains(self) -> Sequence[FallbackChain[Any]]:
        """Chains with at least one usable voice (an empty one would make the service unready)."""
        return [chain for chain in self.routes.values() if chain.levels]

    def create_handler(self, connection: Connection) -> EventHandler:
        from .handler import TtsHandler

        return TtsHandler(connection, self)

    async def start(self) -> None:
        """Load (and warm) every voice of every chain: configured voices stay loaded."""
        for chain in self.chains():
            for index in range(len(chain.levels)):
                await chain.load(index)
        self.state = ServiceState.READY
        self.background(self._prepare_offered(), "prepare-offered")

    async def _prepare_offered(self) -> None:
        """Render what another service of this process expects to be said soon (the handle's
        confirmations for this home, ``context.phrases``) when no answer is in flight, so the
        first time one is said it is already kept. A segment being prepared holds its voice
        until done (Kokoro: about 0.7 s): an answer arriving then waits that long at most."""
        while True:
            language, text = await self.context.phrases.next()
            if self.cache.max_bytes <= 0:
                continue
            try:
                route = self.route(None, language)
            except VoiceError:
                continue
            options = SynthesisOptions(length_scale=self.settings.length_scale, priority=PREPARE_PRIORITY)
            for segment in split_sentences(text, self.splitter_options()):
                await self.in_flight.idle()  # live answers first: wait for a quiet moment
                try:
                    await self.speak(route, segment, options, prepare=True)
                except Exception as error:  # a voice failing here fails no one; answers will tell
                    _LOGGER.debug("tts: could not prepare %r: %s", segment, error)

    async def smoke(self) -> str:
        """One sentence through the default language's chain; kept for the doctor's read-back."""
        route = self.route(None, None)
        options = SynthesisOptions(length_scale=self.settings.length_scale)
        text = SMOKE_SENTENCES.get(route.language, SMOKE_SENTENCES["en"])
        result = await self.speak(route, text, options)
        if result is None:  # pragma: no cover - the sentence is never empty
            raise RuntimeError("nothing to say")
        self.smoke_audio = (result.value, text, route.language)
        return f"{result.engine}: {result.value.seconds:.2f} s of audio"

    # -- what the handler asks -------------------------------------------------------

    def info(self) -> Info:
        """The ``describe`` answer: every configured voice, installed or not."""
        voices = []
        for voice in self.voices.values():
            info = voice.info
            speakers = voice.engine.speakers() if voice.engine is not None else ()
            voices.append(
                TtsVoice(
                    name=info.name,
                    attribution=Attribution(name=info.attribution_name, url=info.attribution_url),
                    installed=info.installed,
                    description=info.description,
                    version=info.version,
                    languages=list(info.languages),
                    speakers=[TtsVoiceSpeaker(name=s) for s in speakers] or None,
                )
            )
        program = TtsProgram(
            name="superwhisper-tts",
            attribution=Attribution(
                name="wyoming-superwhisper", url="https://pypi.org/project/wyoming-superwhisper/"
            ),
            installed=True,
            description="French-first TTS: Piper voices, espeak-ng fallback, sentence streaming",
            version=__version__,
            voices=voices,
            supports_synthesize_streaming=True,
        )
        return Info(tts=[program])

    def route(self, voice: str | None, language: str | None) -> Route:
        """Choose the chain for a request; raise :class:`VoiceError` when none fits."""
        if voice:
            found = self.voices.get(voice)
            if found is None:
                known = ", ".join(sorted(self.voices))
                raise VoiceError("unknown-voice", f"unknown voice {voice!r} (voices: {known})")
            chain = self.routes[found.language]
            if found.level is None:
                _LOGGER.warning("tts: voice %s is not installed, using its language's chain", voice)
                return self._language_route(found.language, voice)
            order = (found.level, *(i for i in range(len(chain.levels)) if i != found.level))
            return Route(found.language, chain, order, voice)
        return self._language_route(language_key(language) if language else self.default_language, None)

    def _language_route(self, language: str, voice: str | None) -> Route:
        chain = self.routes.get(language)
        if chain is None:
            known = ", ".join(sorted(self.routes))
            raise VoiceError(
                "unsupported-language", f"no voice for language {language!r} (languages: {known})"
            )
        if not chain.levels:
            raise VoiceError("voice-not-installed", f"no voice for {language!r} is installed")
        first = chain.levels[0].engine.name
        return Route(language, chain, tuple(range(len(chain.levels))), voice or first)

    def splitter_options(self) -> SplitterOptions:
        """How answers are cut into the segments the voices speak (``tts.first_segment_chars``)."""
        first = self.settings.first_segment_chars
        if first <= 0:
            return SplitterOptions(first_max_chars=self.settings.max_chars)
        return SplitterOptions(first_max_chars=first, first_min_chars=min(16, first))

    def native_rate(self, route: Route) -> int:
        """The rate an answer will have when nothing has been synthesized yet (empty text)."""
        if self.settings.output_rate:
            return self.settings.output_rate
        for index in route.levels:
            rate = route.chain.levels[index].engine.native_rate
            if rate:
                return rate
        return DEFAULT_RATE

    async def speak(
        self,
        route: Route,
        text: str,
        options: SynthesisOptions,
        sink: AudioSink | None = None,
        *,
        prepare: bool = False,
    ) -> ChainResult[Audio] | None:
        """One segment through the route's chain, normalized for its language; None if empty.

        ``prepare``: only to have it kept (:meth:`_prepare_offered`): nothing when it already
        is, counted as ``prepared`` rather than a miss.

        With a ``sink``, the accepted audio goes there: a voice that streams
        (Piper with ``tts.chunked_decode``) hands over each piece as it is decoded,
        after its duration passed the gate; any other voice's audio goes whole once
        accepted. Streamed audio the gate rejects at the end (silence) cannot be
        taken back: the next level then speaks the segment after it.

        Raises :class:`~wyoming_superwhisper.runtime.fallback.AllLevelsFailed`.
        """
        spoken = normalize(text, route.language)
        if not any(ch.isalnum() for ch in spoken):
            return None
        first = route.levels[0]
        voice = route.chain.levels[first].engine
        identity = f"{route.language}[{first}] {self._voice_ids.get(id(voice), voice.name)}"
        key: CacheKey = (identity, spoken, options.length_scale, options.speaker)
        kept = await self.cache.get(key, voice.name)
        if kept is not None:
            if prepare:
                return None
            self.context.metrics.tts_cache.labels("hit").inc()
            if sink is not None:
                await sink(kept, first)
            return ChainResult(kept, first, kept.engine, (), cached=True)
        if self.cache.max_bytes > 0:
            self.context.metrics.tts_cache.labels("prepared" if prepare else "miss").inc()
        streamed: set[int] = set()

        def gate(audio: Audio) -> str | None:
            return check_audio(audio, spoken, options.length_scale)

        async def call(engine: TtsEngine) -> Audio:
            stream = getattr(engine, "synthesize_stream", None)
            if sink is None or not self.settings.chunked_decode or not callable(stream):
                return await engine.synthesize(spoken, options)
            level = route.chain.engines.index(engine)
            pieces: list[bytes] = []
            rate = 0
            async with contextlib.aclosing(stream(spoken, options)) as parts:
                async for part in parts:
                    if not pieces:
                        rate = part.audio.rate
                        seconds = part.expected_samples / max(rate, 1)
                        reason = check_duration(seconds, spoken, options.length_scale)
                        if reason is not None:
                            raise QualityRejected(reason)
                    pieces.append(part.audio.pcm)
                    streamed.add(level)
                    await sink(part.audio, level)
            return Audio(b"".join(pieces), rate, engine.name)

        depth = self.context.metrics.queue_depth.labels(self.name)
        depth.inc()  # segments in the voices' hands (one speaking per voice, the rest waiting)
        try:
            result = await route.chain.run(call, quality_gate=gate, levels=route.levels)
        finally:
            depth.dec()
        if sink is not None and result.level not in streamed:
            await sink(result.value, result.level)
        if result.level == first:
            await self.cache.put(key, result.value)
        return result
