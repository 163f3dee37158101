"""One connection of the ASR server: Wyoming events in, VAD and decodes out.

The handler translates events and owns the state of the current utterance;
the service owns engines, the VAD model and the decode queue. Audio is
converted and run through Silero as it arrives; a short pause after speech
starts a speculative decode, which becomes the answer if the utterance ends
(endpoint or ``audio-stop``) with no new speech, and is dropped if speech
resumes. The user then waits for the silence only, not for the decode.

Order of what a client receives: ``voice-started`` / ``voice-stopped`` as the
VAD decides; ``transcript-start`` and ``transcript-chunk`` when a speculative
decode yields text while audio still arrives; then ``transcript`` (the full
text, what Home Assistant up to 2026.11 reads) and ``transcript-stop``. A
chunk only ever extends the text already sent; the ``transcript`` is the
authority when speech after a pause changed the reading.

Semantic endpointing (``asr.endpointing: semantic`` with ``endpointing_s > 0``):
at a pause of ``turn_decode_pause_s`` the speculative decode starts; at
``turn_pause_s`` Smart Turn reads the audio up to then; when both are in,
:class:`~.turn.TurnJudge` says whether the sentence is over (the decode runs
ahead so that it is ready when the verdict is due). Over: the utterance ends
there (a *cut*); not over: ``endpointing_s`` of silence still ends it. After
a cut the stream goes on in a continuation utterance, whose audio starts at
the end of the speech that was answered: a speaker who was not done gets a
second ``transcript`` with the rest, no word lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from wyoming.asr import Transcribe, Transcript, TranscriptChunk, TranscriptStart, TranscriptStop
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.event import Event
from wyoming.info import Describe
from wyoming.vad import VoiceStarted, VoiceStopped

from ..audio import TARGET_RATE, AudioConverter, AudioFormatError
from ..runtime.fallback import AllLevelsFailed, EngineError
from ..runtime.limits import ProtocolViolation, finite_number
from ..runtime.server import Connection, EventHandler
from .engines import AsrRequest
from .service import AsrService, Decoded, QueueFull
from .turn import PRE_SPEECH_S, WINDOW_SAMPLES
from .vad import FRAME_SAMPLES, SpeechSpan, SpeechTracker, VadEvent, VadStream

_LOGGER = logging.getLogger(__name__)

PAD_BEFORE_S = 0.3
"""Audio kept before the first speech frame: Silero reacts a frame late, Whisper likes a lead-in."""
PAD_AFTER_S = 0.2
"""Audio kept after the last speech frame; a decode started at a shorter pause gets the rest
as digital silence."""
MAX_HINTS = 200
MAX_HINT_CHARS = 100


@dataclass
class _Options:
    """What ``transcribe`` asked for; the configured defaults otherwise."""

    language: str | None = None
    name: str | None = None
    names: tuple[str, ...] = ()
    terms: tuple[str, ...] = ()


@dataclass
class _Speculation:
    span: SpeechSpan
    task: asyncio.Task[Decoded]
    cancel: threading.Event
    turn: asyncio.Task[float] | None = None
    """Smart Turn's probability for the audio up to the verdict's pause, computed beside the decode."""
    judged: bool = False
    """The verdict was asked for (once per speculation)."""


@dataclass
class _Utterance:
    """State of one ``audio-start`` … ``audio-stop``."""

    converter: AudioConverter | None
    vad: VadStream
    tracker: SpeechTracker
    chunks: list[np.ndarray] = field(default_factory=list)
    samples: int = 0
    speculation: _Speculation | None = None
    final: asyncio.Task[None] | None = None
    answered: bool = False
    stream_started: bool = False
    sent_text: str = ""
    reused: Decoded | None = None
    """The speculative decode that became the answer, if one did."""
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    offset: int = 0
    """Samples of the stream before this utterance's audio (a continuation after a cut)."""
    previous: _Utterance | None = None
    """The utterance a semantic cut answered, when this one continues its stream."""
    continuation: _Utterance | None = None
    """Where the stream went on after this utterance was cut."""

    def audio(self) -> np.ndarray:
        if len(self.chunks) > 1:
            self.chunks = [np.concatenate(self.chunks)]
        return self.chunks[0] if self.chunks else np.zeros(0, dtype=np.float32)


class AsrHandler(EventHandler):
    """Per-connection protocol translation for :class:`AsrService`."""

    def __init__(self, connection: Connection, service: AsrService) -> None:
        super().__init__(connection)
        self.service = service
        self.settings = service.settings
        self._options = _Options()
        self._utterance: _Utterance | None = None

    # --- events ------------------------------------------------------------------------

    async def handle_event(self, event: Event) -> bool:
        if Describe.is_type(event.type):
            await self.connection.write(self.service.info_event)
            return True
        if Transcribe.is_type(event.type):
            self._drop_utterance()
            self._options = _parse_transcribe(event.data)
            return True
        if AudioStart.is_type(event.type):
            self._drop_utterance()
            rate, width, channels = _audio_format(event.data)
            self._utterance = self._new_utterance(self._converter(rate, width, channels))
            return True
        if AudioChunk.is_type(event.type):
            await self._on_chunk(event)
            return True
        if AudioStop.is_type(event.type):
            await self._on_stop()
            return True
        return True

    async def disconnect(self) -> None:
        self._drop_utterance()

    # --- audio ---------------------------------------------------------------------------

    @property
    def _semantic(self) -> bool:
        """The server ends utterances itself and judges the sentence at each short pause."""
        return self.service.turn is not None and self.settings.endpointing_s > 0

    @property
    def _pause_s(self) -> float:
        """The pause that starts a speculative decode."""
        if not self._semantic:
            return self.settings.speculative_pause_s
        ahead = self.settings.turn_decode_pause_s
        return min(ahead, self.settings.turn_pause_s) if ahead > 0 else self.settings.turn_pause_s

    def _new_utterance(self, converter: AudioConverter | None, vad: VadStream | None = None) -> _Utterance:
        tracker = SpeechTracker(
            self.settings.vad_threshold,
            pause_s=self._pause_s,
            turn_s=self.settings.turn_pause_s if self._semantic else 0.0,
            endpoint_s=self.settings.endpointing_s,
        )
        return _Utterance(converter, vad if vad is not None else self.service.vad.stream(), tracker)

    def _continue(self, utterance: _Utterance, *, back_to: int) -> _Utterance:
        """The stream's next utterance, from sample ``back_to`` of ``utterance`` on.

        Its tracker is fed silence up to where ``utterance``'s tracker is, so
        frames stay aligned with the VAD stream, and audio since ``back_to``
        (the pause, and a word that had just begun) is kept, not lost.
        """
        follower = self._new_utterance(utterance.converter, utterance.vad)
        position = utterance.tracker.position
        frames = max(0, position - back_to) // FRAME_SAMPLES
        start = position - frames * FRAME_SAMPLES
        for _ in range(frames):
            follower.tracker.update(0.0)
        self._append(follower, utterance.audio()[start:].copy())
        follower.offset = utterance.offset + start
        follower.previous = utterance if utterance.final is not None else utterance.previous
        utterance.continuation = follower
        self._utterance = follower
        return follower

    @staticmethod
    def _converter(rate: int, width: int, channels: int) -> AudioConverter:
        try:
            return AudioConverter(rate, width, channels)
        except AudioFormatError as error:
            raise ProtocolViolation("bad-audio-format", str(error)) from error

    async def _on_chunk(self, event: Event) -> None:
        utterance = self._utterance
        if utterance is None:  # audio without audio-start: a lenient client
            utterance = self._utterance = self._new_utterance(None)
        if utterance.answered or utterance.final is not None:
            return  # endpoint reached or error sent: the rest of the stream is not needed
        rate, width, channels = _audio_format(event.data)
        if utterance.converter is None or not utterance.converter.matches(rate, width, channels):
            if utterance.converter is not None:
                self._append(utterance, utterance.converter.flush())
            utterance.converter = self._converter(rate, width, channels)
        samples = utterance.converter.convert(event.payload or b"")
        if not await self._append_checked(utterance, samples):
            return
        try:
            probabilities = await self.service.vad.probabilities(utterance.vad, samples)
        except EngineError as error:  # the VAD worker is down and did not come back in time
            raise ProtocolViolation("vad-failed", str(error)) from error
        target: _Utterance | None = utterance
        for probability in probabilities:
            target = _live(target)  # a cut while this ran moves the stream to its continuation
            if target is None:
                break
            for vad_event in target.tracker.update(probability):
                await self._on_vad(target, vad_event)

    def _append(self, utterance: _Utterance, samples: np.ndarray) -> None:
        if len(samples):
            utterance.chunks.append(samples)
            utterance.samples += len(samples)

    async def _append_checked(self, utterance: _Utterance, samples: np.ndarray) -> bool:
        self._append(utterance, samples)
        if utterance.samples <= self.settings.max_seconds * TARGET_RATE:
            return True
        if utterance.previous is not None and utterance.tracker.span is None:
            # Nothing said since the cut: that silence is no request; keep listening from here.
            utterance.answered = True
            self._continue(utterance, back_to=utterance.tracker.position)
            return True
        if self.settings.endpointing_s > 0 and utterance.tracker.span is None:
            # The server ends the utterance (endpointing) and nobody spoke for asr.max_seconds:
            # that is silence, answered as silence is (an empty transcript), not an error.
            utterance.chunks = []
            utterance.final = self._spawn(utterance, self._finish(utterance, "endpoint", time.monotonic()))
            return False
        self._cancel_tasks(utterance)
        utterance.answered = True
        utterance.chunks = []
        self.service.context.metrics.count(self.service.name, "rejected_input")
        await self.connection.error(
            f"audio longer than {self.settings.max_seconds:g} s (asr.max_seconds)", "audio-too-long"
        )
        return False

    async def _on_vad(self, utterance: _Utterance, vad_event: VadEvent) -> None:
        tracker = utterance.tracker
        span = tracker.span
        assert span is not None
        if vad_event is VadEvent.STARTED:
            if utterance.speculation is not None:
                self.service.speculative_misses += 1
                self.service.context.metrics.speculative.labels("miss").inc()
            self._drop_speculation(utterance)
            await self.connection.write(VoiceStarted(timestamp=_ms(utterance.offset + span.start)).event())
        elif vad_event is VadEvent.PAUSED:
            await self.connection.write(VoiceStopped(timestamp=_ms(utterance.offset + span.end)).event())
            endpoint_now = 0 < self.settings.endpointing_s <= self._pause_s
            if not endpoint_now and self.service.can_speculate():
                self._speculate(utterance, span)
        elif vad_event is VadEvent.TURN:
            self._hear_turn(utterance, span)
        elif vad_event is VadEvent.ENDPOINT and utterance.final is None:
            started = time.monotonic()
            utterance.final = self._spawn(utterance, self._finish(utterance, "endpoint", started))

    # --- speculation -----------------------------------------------------------------------

    def _speculate(self, utterance: _Utterance, span: SpeechSpan) -> None:
        self._drop_speculation(utterance)
        cancel = threading.Event()
        request = self._request(utterance, span)
        task = asyncio.create_task(
            self._speculative_decode(utterance, request, cancel), name="asr-speculative"
        )
        utterance.speculation = _Speculation(span, task, cancel)
        _LOGGER.debug("asr %s: speculative decode of %.2f s", self.connection.peer, request.seconds)

    def _hear_turn(self, utterance: _Utterance, span: SpeechSpan) -> None:
        """The verdict's pause: Smart Turn hears the utterance, the judge follows the decode."""
        speculation = utterance.speculation
        if (
            not self._semantic
            or self.service.turn is None
            or speculation is None
            or speculation.span != span
            or speculation.turn is not None
        ):
            return
        # Smart Turn hears the utterance up to now (as Pipecat feeds it: from 0.5 s before the
        # speech), while Whisper finishes decoding: the verdict waits for neither in turn.
        end = utterance.tracker.position
        start = max(0, span.start - int(PRE_SPEECH_S * TARGET_RATE), end - WINDOW_SAMPLES)
        audio = utterance.audio()[start:end].copy()  # the model reads the last 8 s only
        speculation.turn = asyncio.create_task(self.service.turn.audio_probability(audio), name="asr-turn")
        speculation.turn.add_done_callback(_consume)
        task = speculation.task
        if task.done() and not task.cancelled() and task.exception() is None:
            self._ask_verdict(utterance, speculation, task.result())  # decoded during the pause

    def _ask_verdict(self, utterance: _Utterance, speculation: _Speculation, decoded: Decoded) -> None:
        """Judge once the decode and Smart Turn are both under way; once per speculation."""
        if speculation.turn is None or speculation.judged or not decoded.result.text:
            return
        speculation.judged = True
        self._spawn(utterance, self._judge_turn(utterance, speculation, decoded))

    async def _speculative_decode(
        self, utterance: _Utterance, request: AsrRequest, cancel: threading.Event
    ) -> Decoded:
        decoded = await self.service.decode(
            request, cancel=cancel, speculative=True, levels=self.service.model_levels(self._options.name)
        )
        speculation = utterance.speculation
        if (
            speculation is not None
            and speculation.cancel is cancel
            and not utterance.answered
            and utterance.final is None
            and decoded.result.text
        ):
            with contextlib.suppress(ConnectionError):
                await self._send_partial(utterance, decoded.result.text, decoded.result.language)
            self._ask_verdict(utterance, speculation, decoded)  # when the verdict's pause came first
        return decoded

    async def _judge_turn(self, utterance: _Utterance, speculation: _Speculation, decoded: Decoded) -> None:
        """Semantic endpointing: end the utterance now if the sentence is over."""
        judge = self.service.turn
        assert judge is not None
        language = decoded.result.language or self._language()
        names = (*self._options.names, *self.service.names_hints())
        verdict = await judge.judge(
            decoded.result.text,
            language,
            probability=speculation.turn,
            names=names,
            avg_logprob=decoded.result.avg_logprob,
        )
        decisions = self.service.context.metrics.endpoint_decisions
        current = (
            utterance.speculation is speculation
            and not speculation.cancel.is_set()
            and not utterance.answered
            and utterance.final is None
        )
        decision = "stale" if not current else "complete" if verdict.complete else "incomplete"
        decisions.labels(decision, verdict.reason).inc()
        _LOGGER.debug(
            "asr %s: turn %s (%s, p=%s, text %s, logprob %.2f, %.0f ms): %r",
            self.connection.peer,
            decision,
            verdict.reason,
            "-" if verdict.probability is None else f"{verdict.probability:.2f}",
            verdict.cue.value,
            decoded.result.avg_logprob,
            verdict.seconds * 1000,
            decoded.result.text,
        )
        if decision != "complete":
            return
        span = speculation.span
        utterance.final = self._spawn(utterance, self._finish(utterance, "semantic", time.monotonic()))
        self._continue(utterance, back_to=span.end)

    def _drop_speculation(self, utterance: _Utterance) -> None:
        speculation = utterance.speculation
        if speculation is None:
            return
        utterance.speculation = None
        speculation.cancel.set()
        speculation.task.cancel()
        speculation.task.add_done_callback(_consume)
        if speculation.turn is not None:
            speculation.turn.cancel()

    # --- answers ---------------------------------------------------------------------------

    async def _on_stop(self) -> None:
        started = time.monotonic()
        utterance = self._utterance
        if utterance is None:
            utterance = self._new_utterance(None)
        if utterance.final is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await utterance.final  # the endpoint already answered or is answering
        elif utterance.previous is not None and utterance.tracker.span is None:
            await _answered(utterance.previous)  # a cut answered it all; nothing said since
        elif not utterance.answered:
            if utterance.converter is not None:
                self._append(utterance, utterance.converter.flush())
            await self._finish(utterance, "audio-stop", started)
        self._drop_utterance()
        self._options = _Options()

    async def _finish(self, utterance: _Utterance, reason: str, started: float) -> None:
        """Answer the utterance: reuse a still-valid speculative decode, or decode now."""
        metrics = self.service.context.metrics
        span = utterance.tracker.span
        language = self._language()
        try:
            if span is None:
                decoded: Decoded | None = None  # no speech at all: nothing to decode, nothing to invent
            else:
                decoded = await self._final_decode(utterance, span)
        except (QueueFull, AllLevelsFailed) as error:
            utterance.answered = True
            # Queue full, or every level still busy at asr.timeout_s: load, not a fault.
            if isinstance(error, QueueFull) or error.overloaded:
                metrics.count(self.service.name, "busy")
                await self.connection.error(f"server busy: {error}", "busy")
            else:
                metrics.count(self.service.name, "error")
                await self.connection.error(str(error), "transcription-failed")
            return
        text = decoded.result.text if decoded is not None else ""
        if decoded is not None:
            language = decoded.result.language or language
        if utterance.previous is not None:
            await _answered(utterance.previous)  # transcripts go out in the order they were said
        utterance.answered = True
        try:
            await self._send_partial(utterance, text, language)
            await self.connection.write(Transcript(text=text, language=language).event())
        except ConnectionError:
            _LOGGER.info("asr %s: client left before the transcript", self.connection.peer)
            return
        # The answer is out: counted even when the client hangs up before transcript-stop,
        # as Home Assistant does once it has read the transcript.
        level = decoded.level if decoded is not None else 0
        metrics.count(self.service.name, "fallback" if decoded is not None and decoded.fell_back else "ok")
        stage = "audio_stop_to_transcript" if reason == "audio-stop" else "endpoint_to_transcript"
        # (a semantic cut counts as an endpoint: from the verdict to the transcript)
        metrics.observe(self.service.name, stage, time.monotonic() - started, level)
        with contextlib.suppress(ConnectionError):
            await self.connection.write(TranscriptStop().event())
        _LOGGER.info(
            "asr %s: %r (%s, %s, %.0f ms after %s)",
            self.connection.peer,
            text,
            decoded.engine if decoded is not None else "no speech",
            "speculative" if decoded is not None and decoded is utterance.reused else "final",
            (time.monotonic() - started) * 1000,
            reason,
        )

    async def _final_decode(self, utterance: _Utterance, span: SpeechSpan) -> Decoded:
        speculation = utterance.speculation
        if speculation is not None and speculation.span == span and not speculation.cancel.is_set():
            try:
                decoded = await asyncio.shield(speculation.task)
            except (QueueFull, AllLevelsFailed, asyncio.CancelledError):
                _LOGGER.debug("asr: speculative decode unusable, decoding again")
            else:
                self.service.speculative_hits += 1
                self.service.context.metrics.speculative.labels("hit").inc()
                utterance.reused = decoded
                return decoded
        self._drop_speculation(utterance)
        return await self.service.decode(
            self._request(utterance, span), levels=self.service.model_levels(self._options.name)
        )

    async def _send_partial(self, utterance: _Utterance, text: str, language: str) -> None:
        """``transcript-start`` once, then a ``transcript-chunk`` for text beyond what was sent."""
        if not utterance.stream_started:
            utterance.stream_started = True
            await self.connection.write(TranscriptStart(language=language).event())
        if text and text.startswith(utterance.sent_text) and len(text) > len(utterance.sent_text):
            piece = text[len(utterance.sent_text) :]
            utterance.sent_text = text
            await self.connection.write(TranscriptChunk(text=piece).event())

    # --- helpers ---------------------------------------------------------------------------

    def _language(self) -> str:
        return self._options.language or self.settings.language

    def _request(self, utterance: _Utterance, span: SpeechSpan) -> AsrRequest:
        audio = utterance.audio()
        start = max(0, span.start - int(PAD_BEFORE_S * TARGET_RATE))
        end = span.end + int(PAD_AFTER_S * TARGET_RATE)
        samples = audio[start:end]
        if len(samples) < end - start:
            # Decoded at a pause shorter than the pad (semantic endpointing decodes at 0.1 s):
            # the pause goes on in digital silence, so Whisper reads the same trailing quiet
            # as it would at the end (with 0.1 s only, it dropped "Turn on the" before a name).
            samples = np.concatenate([samples, np.zeros(end - start - len(samples), samples.dtype)])
        return AsrRequest(
            audio=samples.copy(),
            language=self._language(),
            beam_size=self.settings.beam_size,
            names=(*self._options.names, *self.service.names_hints()),
            terms=self._options.terms,
        )

    def _spawn(self, utterance: _Utterance, coroutine: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.create_task(coroutine, name="asr-finish")
        utterance.tasks.add(task)
        task.add_done_callback(utterance.tasks.discard)
        task.add_done_callback(_consume)
        return task

    def _cancel_tasks(self, utterance: _Utterance) -> None:
        self._drop_speculation(utterance)
        for task in list(utterance.tasks):
            task.cancel()

    def _drop_utterance(self) -> None:
        """Forget the current utterance and stop its work (new request or client gone)."""
        utterance = self._utterance
        self._utterance = None
        while utterance is not None:  # and the cut ones whose answers may still be on their way
            self._cancel_tasks(utterance)
            utterance = utterance.previous


def _live(utterance: _Utterance | None) -> _Utterance | None:
    """The utterance that now takes the stream's frames: ``utterance`` or its continuation."""
    while utterance is not None and (utterance.answered or utterance.final is not None):
        utterance = utterance.continuation
    return utterance


async def _answered(utterance: _Utterance) -> None:
    """Wait until a cut utterance's answer is out (or was given up)."""
    if utterance.final is not None:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(utterance.final)


def _consume(task: asyncio.Task[Any]) -> None:
    """Retrieve a background task's outcome so asyncio never logs it as lost."""
    if task.cancelled():
        return
    error = task.exception()
    if error is not None and not isinstance(error, QueueFull | AllLevelsFailed | ConnectionError):
        _LOGGER.warning("asr: background decode failed: %s", error, exc_info=error)


def _ms(samples: int) -> int:
    return int(samples * 1000 / TARGET_RATE)


def _audio_format(data: dict[str, Any]) -> tuple[int, int, int]:
    rate = finite_number(data, "rate", TARGET_RATE, 1000, 384000)
    width = finite_number(data, "width", 2, 1, 4)
    channels = finite_number(data, "channels", 1, 1, 32)
    if rate != int(rate) or width != int(width) or channels != int(channels):
        raise ProtocolViolation("bad-value", "rate, width and channels must be whole numbers")
    return int(rate), int(width), int(channels)


def _strings(data: dict[str, Any], key: str) -> tuple[str, ...]:
    value = data.get(key)
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ProtocolViolation("bad-value", f"'{key}' must be a list of strings")
    return tuple(item[:MAX_HINT_CHARS] for item in value[:MAX_HINTS] if item.strip())


def _parse_transcribe(data: dict[str, Any]) -> _Options:
    language = data.get("language")
    if language is not None and (not isinstance(language, str) or len(language) > 16):
        raise ProtocolViolation("bad-value", "'language' must be a short string such as 'fr'")
    name = data.get("name")
    if name is not None and not isinstance(name, str):
        raise ProtocolViolation("bad-value", "'name' must be a string")
    code = language.replace("_", "-").split("-")[0].lower() if language else None
    return _Options(
        language=code or None,
        name=name or None,
        names=_strings(data, "transcript_names"),
        terms=_strings(data, "transcript_terms"),
    )
