"""Wyoming TTS handler: events in, audio out, one sentence at a time.

A request (``synthesize``, or the streaming ``synthesize-start`` →
``synthesize-chunk``… → ``synthesize-stop``) becomes a :class:`_Response`: a
queue of segments and a task that synthesizes them in order and writes
``audio-start`` once, ``audio-chunk``… per segment, ``audio-stop`` once (and
``synthesize-stopped`` for a stream). The handler keeps reading events while
the task runs, so a streamed sentence is spoken while the LLM is still writing
the next one, and a ``describe`` on the same connection is answered at once.

Home Assistant builds its WAV header from the first ``audio-start``: every
segment of one response is resampled to the rate of the first one (or to
``tts.output_rate``), whichever voice answered it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import soxr
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.event import Event
from wyoming.info import Describe
from wyoming.tts import (
    Synthesize,
    SynthesizeChunk,
    SynthesizeStart,
    SynthesizeStop,
    SynthesizeStopped,
)

from ..runtime.fallback import AllLevelsFailed, ClientGone
from ..runtime.limits import ProtocolViolation
from ..runtime.server import Connection, EventHandler
from .engines import CHANNELS, SAMPLE_WIDTH, Audio, SynthesisOptions
from .sentences import SentenceSplitter, split_sentences

if TYPE_CHECKING:
    from .service import Route, TtsService

_LOGGER = logging.getLogger(__name__)

SAMPLES_PER_CHUNK = 2048
"""Samples per ``audio-chunk`` event (about 93 ms at 22050 Hz)."""


class _Resampler:
    """One segment's pieces to the answer's rate; soxr keeps its state across pieces (no seams)."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self._source = 0
        self._stream: soxr.ResampleStream | None = None

    def feed(self, audio: Audio) -> bytes:
        if audio.rate == self.rate:
            return self.flush() + audio.pcm
        tail = b""
        if audio.rate != self._source or self._stream is None:
            tail = self.flush()
            self._source = audio.rate
            self._stream = soxr.ResampleStream(audio.rate, self.rate, 1, dtype="int16", quality="HQ")
        samples = np.frombuffer(audio.pcm[: audio.samples * SAMPLE_WIDTH], dtype="<i2")
        return tail + np.asarray(self._stream.resample_chunk(samples, last=False), dtype="<i2").tobytes()

    def flush(self) -> bytes:
        """The resampler's tail at the end of a segment (nothing when no resampling)."""
        stream, self._stream, self._source = self._stream, None, 0
        if stream is None:
            return b""
        tail = stream.resample_chunk(np.zeros(0, dtype="<i2"), last=True)
        return np.asarray(tail, dtype="<i2").tobytes()


class _Response:
    """One answer: segments in through :meth:`add`, audio out in order from one task."""

    def __init__(
        self,
        handler: TtsHandler,
        route: Route,
        options: SynthesisOptions,
        *,
        streaming: bool,
        after: asyncio.Task[None] | None,
    ) -> None:
        self.handler = handler
        self.route = route
        self.options = options
        self.streaming = streaming
        self.chars = 0
        self.rejected = False
        self._queue: asyncio.Queue[str | None] = asyncio.Queue()
        self._started = time.monotonic()
        self.task = asyncio.create_task(self._run(after), name=f"tts-response-{handler.connection.peer}")

    def add(self, segments: list[str]) -> None:
        for segment in segments:
            self._queue.put_nowait(segment)

    def finish(self) -> None:
        self._queue.put_nowait(None)

    async def _run(self, after: asyncio.Task[None] | None) -> None:
        if after is not None:  # one answer at a time per connection, in request order
            # asyncio.wait neither raises the earlier answer's failure or cancellation nor
            # swallows ours (disconnect, an over-long stream): we must stay cancellable here.
            await asyncio.wait({after})
        service = self.handler.service
        connection = self.handler.connection
        metrics = service.context.metrics
        rate = service.settings.output_rate or 0
        audio_started = False
        failed = False
        worst_level = 0
        segments = 0
        speak_seconds = audio_seconds = 0.0
        try:
            while True:
                segment = await self._queue.get()
                if segment is None:
                    break
                if failed:
                    continue  # drain a stream that already failed until its synthesize-stop
                options = dataclasses.replace(
                    self.options, priority=(0.0 if segments == 0 else 1.0, self._started)
                )
                segments += 1
                speak_started = time.monotonic()
                resampler: _Resampler | None = None

                async def deliver(audio: Audio, level: int) -> None:
                    # A segment's audio as the voice hands it over: a streaming voice's
                    # first piece goes out before the rest of the sentence is decoded.
                    nonlocal rate, audio_started, resampler
                    if not rate:
                        rate = audio.rate
                    if resampler is None:
                        resampler = _Resampler(rate)
                    pcm = resampler.feed(audio)
                    if not audio_started:
                        await self._send(AudioStart(rate, SAMPLE_WIDTH, CHANNELS).event())
                        audio_started = True
                        first = time.monotonic() - self._started
                        metrics.observe(service.name, "first_audio", first, level)
                    await self._write_audio(pcm, rate)

                try:
                    result = await service.speak(self.route, segment, options, deliver)
                except AllLevelsFailed as error:
                    _LOGGER.warning("tts %s: %s", connection.peer, error)
                    if error.overloaded:  # every voice still busy after tts.timeout_s
                        metrics.count(service.name, "busy")
                        await connection.error(f"server busy: {error}", "busy")
                    else:
                        metrics.count(service.name, "error")
                        await connection.error(f"no voice could speak this text: {error}", "synthesis-failed")
                    failed = True
                    continue
                if result is None:
                    continue
                if resampler is not None:
                    await self._write_audio(resampler.flush(), rate)
                worst_level = max(worst_level, result.level)
                if not result.cached:  # the real-time factor is the voices' speed, not the cache's
                    audio = result.value
                    speak_seconds += time.monotonic() - speak_started
                    audio_seconds += len(audio.pcm) / (SAMPLE_WIDTH * CHANNELS * audio.rate)
            if not failed:
                if not audio_started:
                    rate = rate or service.native_rate(self.route)
                    await connection.write(AudioStart(rate, SAMPLE_WIDTH, CHANNELS).event())
                await connection.write(AudioStop().event())
                metrics.observe(service.name, "synthesis", time.monotonic() - self._started, worst_level)
                if audio_seconds > 0:
                    metrics.real_time_factor.labels(str(worst_level)).observe(speak_seconds / audio_seconds)
                metrics.count(service.name, "fallback" if worst_level else "ok")
            if self.streaming:
                await connection.write(SynthesizeStopped().event())
        except (ConnectionError, ClientGone):
            _LOGGER.info("tts %s: client gone mid-answer", connection.peer)

    async def _send(self, event: Event) -> None:
        """Write from inside a voice's turn: a client gone is not the voice's failure."""
        try:
            await self.handler.connection.write(event)
        except ConnectionError as error:
            raise ClientGone() from error

    async def _write_audio(self, pcm: bytes, rate: int) -> None:
        step = SAMPLES_PER_CHUNK * SAMPLE_WIDTH * CHANNELS
        for offset in range(0, len(pcm), step):
            chunk = AudioChunk(rate, SAMPLE_WIDTH, CHANNELS, pcm[offset : offset + step])
            await self._send(chunk.event())


class TtsHandler(EventHandler):
    """Translates Wyoming TTS events for one connection; owns its requests, not the voices."""

    def __init__(self, connection: Connection, service: TtsService) -> None:
        super().__init__(connection)
        self.service = service
        self._stream: _Response | None = None
        self._splitter: SentenceSplitter | None = None
        self._last: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def handle_event(self, event: Event) -> bool:
        if Describe.is_type(event.type):
            await self.connection.write(self.service.info().event())
        elif SynthesizeStart.is_type(event.type):
            await self._start_stream(event)
        elif SynthesizeChunk.is_type(event.type):
            await self._stream_chunk(event)
        elif SynthesizeStop.is_type(event.type):
            await self._stop_stream()
        elif Synthesize.is_type(event.type):
            if self._stream is None:  # during a stream it repeats the chunks: ignore it
                await self._synthesize(event)
        else:
            _LOGGER.debug("tts %s: ignoring %s", self.connection.peer, event.type)
        return True

    async def disconnect(self) -> None:
        """The client is gone: stop every answer in flight (the voices finish their sentence)."""
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._stream = None

    # -- requests ------------------------------------------------------------------

    def _options(self, data: dict[str, Any]) -> tuple[str | None, str | None, SynthesisOptions]:
        voice = data.get("voice") or {}
        if not isinstance(voice, dict):
            raise ProtocolViolation("bad-value", "'voice' must be an object")
        name, language, speaker = voice.get("name"), voice.get("language"), voice.get("speaker")
        for key, value in (("voice.name", name), ("voice.language", language), ("voice.speaker", speaker)):
            if value is not None and not isinstance(value, str | int):
                raise ProtocolViolation("bad-value", f"'{key}' must be a string")
        options = SynthesisOptions(
            speaker=None if speaker in (None, "") else str(speaker),
            length_scale=self.service.settings.length_scale,
        )
        return (str(name) if name else None), (str(language) if language else None), options

    async def _new_response(
        self, route: Route, options: SynthesisOptions, *, streaming: bool
    ) -> _Response | None:
        """The answer's task, or None (``busy`` sent) when ``tts.queue_size`` are in flight."""
        in_flight = self.service.in_flight
        if not in_flight.try_enter():
            self.service.context.metrics.count(self.service.name, "busy")
            await self.connection.error(
                f"server busy: {in_flight.limit} answers already in flight (tts.queue_size)", "busy"
            )
            return None
        response = _Response(self, route, options, streaming=streaming, after=self._last)
        self._last = response.task
        self._tasks.add(response.task)
        response.task.add_done_callback(self._tasks.discard)
        response.task.add_done_callback(lambda _: in_flight.leave())
        return response

    async def _route(self, data: dict[str, Any]) -> tuple[Route, SynthesisOptions] | None:
        from .service import VoiceError

        name, language, options = self._options(data)
        try:
            return self.service.route(name, language), options
        except VoiceError as error:
            self.service.context.metrics.count(self.service.name, "rejected_input")
            await self.connection.error(str(error), error.code)
            return None

    async def _synthesize(self, event: Event) -> None:
        text = event.data.get("text")
        if not isinstance(text, str):
            raise ProtocolViolation("bad-value", "'text' must be a string")
        if await self._too_long(len(text)):
            return
        routed = await self._route(event.data)
        if routed is None:
            return
        response = await self._new_response(*routed, streaming=False)
        if response is None:
            return
        response.add(split_sentences(text, self.service.splitter_options()))
        response.finish()

    async def _start_stream(self, event: Event) -> None:
        if self._stream is not None:  # a new stream without a stop: finish the old one first
            await self._stop_stream()
        routed = await self._route(event.data)
        if routed is None:
            # Keep a rejected stream so its chunks and stop are absorbed quietly.
            self._stream = None
            self._splitter = None
            return
        self._stream = await self._new_response(*routed, streaming=True)
        # Busy: like a refused route, the stream's chunks and stop are absorbed quietly.
        self._splitter = (
            SentenceSplitter(self.service.splitter_options()) if self._stream is not None else None
        )

    async def _stream_chunk(self, event: Event) -> None:
        text = event.data.get("text")
        if not isinstance(text, str):
            raise ProtocolViolation("bad-value", "'text' must be a string")
        stream, splitter = self._stream, self._splitter
        if stream is None or splitter is None:
            return  # no stream (never started, or refused): nothing to add to
        if stream.rejected:
            return
        stream.chars += len(text)
        if stream.chars > self.service.settings.max_chars:
            stream.rejected = True
            stream.task.cancel()
            self._tasks.discard(stream.task)
            if self._last is stream.task:
                self._last = None
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await stream.task
            await self._too_long(stream.chars)
            return
        stream.add(splitter.feed(text))

    async def _stop_stream(self) -> None:
        stream, splitter = self._stream, self._splitter
        self._stream, self._splitter = None, None
        if stream is None or splitter is None:
            return
        if stream.rejected:  # already answered with an error: close the stream for the client
            await self.connection.write(SynthesizeStopped().event())
            return
        stream.add(splitter.flush())
        stream.finish()

    async def _too_long(self, chars: int) -> bool:
        limit = self.service.settings.max_chars
        if chars <= limit:
            return False
        self.service.context.metrics.count(self.service.name, "rejected_input")
        await self.connection.error(
            f"text too long: {chars} characters, the limit is {limit}", "text-too-long"
        )
        return True
