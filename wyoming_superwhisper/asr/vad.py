"""Streaming Silero VAD: speech probabilities per 32 ms frame, and what they mean.

Two parts, kept apart so the decisions are testable without a model:

* :class:`SileroVad` / :class:`VadStream` run Silero on 512-sample frames at
  16 kHz as audio arrives. One ONNX session (:class:`SileroSession`, in a
  supervised worker process by default) is shared by every stream; each
  stream keeps its own recurrent state and 64-sample context here, so a
  stream costs nothing to open and survives a restart of the worker.
  Without onnxruntime the TorchScript model of the ``silero_vad`` package is
  used instead, one instance per stream. :meth:`SileroVad.probabilities` runs
  a stream's frames on the VAD's own worker threads: inline, tens of streams
  starve the event loop, and with it every other connection and ``/metrics``.
* :class:`SpeechTracker` is a pure state machine over those probabilities:
  where speech starts and ends, when a pause is long enough to decode
  speculatively, when it is long enough to end the utterance.
"""

from __future__ import annotations

import asyncio
import enum
import importlib.util
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from typing import Any

import numpy as np

from ..runtime.fallback import EngineCrashed, EngineError
from ..runtime.worker import EngineWorker, WorkerOptions, supervised

_LOGGER = logging.getLogger(__name__)

FRAME_SAMPLES = 512
"""Silero's frame at 16 kHz (32 ms)."""
CONTEXT_SAMPLES = 64
"""Samples of the previous frame Silero prepends to each frame at 16 kHz."""
SAMPLE_RATE = 16000


class SileroSession:
    """The Silero ONNX model as an engine: frames and a stream's recurrent state in,
    probabilities and the new state out.

    It keeps no per-stream state, so it can run in a supervised worker process
    (``server.engine_workers``) and a restarted worker resumes every open
    stream where it was: the streams' state lives with the server.
    """

    name = "silero-vad"
    device = "cpu"
    quality = 0

    def __init__(self) -> None:
        self._session: Any = None

    async def load(self) -> None:
        if self._session is None:
            self._session = await asyncio.to_thread(self.open)

    def open(self) -> Any:
        """Load the model (about 0.1 s); it ships inside the ``silero_vad`` wheel."""
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.inter_op_num_threads = 1
        options.intra_op_num_threads = 1
        path = resources.files("silero_vad").joinpath("data/silero_vad.onnx")
        with resources.as_file(path) as model_file:
            self._session = onnxruntime.InferenceSession(
                str(model_file), sess_options=options, providers=["CPUExecutionProvider"]
            )
        return self._session

    async def close(self) -> None:
        self._session = None

    async def run(self, frames: np.ndarray, state: np.ndarray, context: np.ndarray) -> VadOutput:
        """Frames of one stream, in order; in a thread (ONNX Runtime releases the GIL)."""
        return await asyncio.to_thread(self.run_blocking, frames, state, context)

    def run_blocking(self, frames: np.ndarray, state: np.ndarray, context: np.ndarray) -> VadOutput:
        if self._session is None:
            raise RuntimeError("Silero VAD is not loaded")
        rate = np.array(SAMPLE_RATE, dtype=np.int64)
        probabilities: list[float] = []
        for frame in frames:
            joined = np.concatenate([context, frame]).astype(np.float32)[np.newaxis, :]
            output, state = self._session.run(None, {"input": joined, "state": state, "sr": rate})
            context = joined[0, -CONTEXT_SAMPLES:]
            probabilities.append(float(output[0][0]))
        return probabilities, state, context


VadOutput = tuple[list[float], np.ndarray, np.ndarray]

VAD_RESTART_WAIT_S = 10.0
"""How long a stream waits for a crashed VAD worker to come back before its request fails."""


class SileroVad:
    """The shared Silero model; :meth:`stream` opens a per-utterance detector.

    With a :class:`WorkerOptions`, the model runs in a supervised worker
    process; without, in this process on the VAD's own threads.
    """

    def __init__(self, workers: WorkerOptions | None = None) -> None:
        self._session = SileroSession()
        self._lock = threading.Lock()
        self.backend = ""
        self._workers = min(4, os.cpu_count() or 1)
        self._executor: ThreadPoolExecutor | None = None
        self.worker: EngineWorker | None = None
        if workers is not None and importlib.util.find_spec("onnxruntime") is not None:
            self.worker = supervised(workers, SileroSession, calls=("run",))

    async def start(self) -> None:
        """Load the model (in the worker, or here)."""
        if self.worker is not None:
            await self.worker.load()
            self.backend = "onnx-worker"
            _LOGGER.info("Silero VAD loaded in a worker process")
            return
        await asyncio.to_thread(self.load)

    def load(self) -> None:
        """Load in this process, once."""
        with self._lock:
            if self.backend:
                return
            if importlib.util.find_spec("onnxruntime") is not None:
                self._session.open()
                self.backend = "onnx"
            else:
                import silero_vad

                silero_vad.load_silero_vad()  # fail now, not on the first stream
                self.backend = "torch"
            _LOGGER.info("Silero VAD loaded (%s)", self.backend)

    def stream(self) -> VadStream:
        if not self.backend:
            self.load()
        if self.backend == "torch":
            import silero_vad

            return VadStream(None, silero_vad.load_silero_vad())
        return VadStream(self._session, None)

    async def probabilities(self, stream: VadStream, samples: np.ndarray) -> list[float]:
        """``stream.process(samples)`` off the event loop when it completes a frame.

        A stream's chunks arrive one after the other on its connection, so its
        frames never run concurrently; different streams run in parallel.
        Samples that complete no frame are only buffered, which needs neither
        a thread nor the worker. A crashed worker is waited for (its restart)
        and asked again once: the stream's state is here, nothing is lost.
        """
        if not stream.completes_frame(len(samples)):
            return stream.process(samples)
        if self.worker is not None:
            frames = stream.take_frames(samples)
            try:
                output = await self.worker.run(frames, stream.state, stream.context)
            except EngineCrashed as crash:
                _LOGGER.warning("VAD worker crashed (%s): waiting for its restart", crash.cause)
                try:
                    output = await asyncio.wait_for(
                        self.worker.run(frames, stream.state, stream.context), VAD_RESTART_WAIT_S
                    )
                except (EngineCrashed, TimeoutError) as error:
                    raise EngineError(f"the VAD worker is down ({crash.cause})") from error
            return stream.apply(output)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self._workers, thread_name_prefix="silero-vad")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, stream.process, samples)

    def worker_status(self) -> dict[str, Any] | None:
        return self.worker.worker_status() if self.worker is not None else None

    async def stop(self) -> None:
        """Stop the worker or the threads: frames not yet started are dropped, a running one ends."""
        if self.worker is not None:
            await self.worker.close()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None


class VadStream:
    """Feeds 16 kHz samples of one stream to Silero; yields one probability per frame."""

    def __init__(self, session: SileroSession | None, torch_model: Any) -> None:
        self._session = session
        self._torch_model = torch_model
        self.state = np.zeros((2, 1, 128), dtype=np.float32)
        self.context = np.zeros(CONTEXT_SAMPLES, dtype=np.float32)
        self._pending = np.zeros(0, dtype=np.float32)

    def completes_frame(self, count: int) -> bool:
        """True when ``count`` more samples complete at least one frame."""
        return len(self._pending) + count >= FRAME_SAMPLES

    def take_frames(self, samples: np.ndarray) -> np.ndarray:
        """The whole frames completed by ``samples`` (shape ``(n, 512)``); the rest is kept."""
        data = np.concatenate([self._pending, samples]) if len(self._pending) else samples
        whole = len(data) - len(data) % FRAME_SAMPLES
        self._pending = data[whole:].copy()
        return np.asarray(data[:whole], dtype=np.float32).reshape(-1, FRAME_SAMPLES)

    def apply(self, output: VadOutput) -> list[float]:
        probabilities, self.state, self.context = output
        return probabilities

    def process(self, samples: np.ndarray) -> list[float]:
        """Speech probability of every whole frame completed by ``samples`` (in this process)."""
        return [self._frame(frame) for frame in self.take_frames(samples)]

    def _frame(self, frame: np.ndarray) -> float:
        if self._torch_model is not None:
            import torch

            with torch.no_grad():
                return float(
                    self._torch_model(torch.from_numpy(frame.astype(np.float32)), SAMPLE_RATE).item()
                )
        assert self._session is not None
        return self.apply(self._session.run_blocking(frame[np.newaxis, :], self.state, self.context))[0]


class VadEvent(enum.Enum):
    STARTED = "started"
    """Speech began (first time, or again after a pause that was reported)."""
    PAUSED = "paused"
    """Speech has been followed by ``pause_s`` of silence: time to decode speculatively."""
    TURN = "turn"
    """Speech has been followed by ``turn_s`` of silence: time to judge whether the sentence is over."""
    ENDPOINT = "endpoint"
    """Speech has been followed by ``endpoint_s`` of silence: the utterance is over."""


@dataclass(frozen=True)
class SpeechSpan:
    """Where the speech of an utterance lies, in 16 kHz samples from the stream's start."""

    start: int
    end: int


class SpeechTracker:
    """Hysteresis over frame probabilities: speech runs, pauses and the endpoint.

    A frame at or above ``threshold`` is speech; once speaking, frames stay
    speech until they drop below ``threshold - 0.15`` (Silero's own advice), so
    a soft syllable does not split a word. Speech must last ``min_speech_frames``
    to count (a click is not a command). A pause is measured from the end of
    the last speech frame; it is reported at ``pause_s`` (decode now), at
    ``turn_s`` (judge the sentence now) and at ``endpoint_s`` (the utterance is
    over), each once until speech resumes.
    """

    def __init__(
        self,
        threshold: float = 0.5,
        *,
        pause_s: float = 0.3,
        endpoint_s: float = 0.0,
        turn_s: float = 0.0,
        min_speech_frames: int = 3,
    ) -> None:
        self.threshold = threshold
        self.negative_threshold = max(0.0, threshold - 0.15)
        self.pause_samples = int(pause_s * SAMPLE_RATE) if pause_s > 0 else 0
        self.turn_samples = int(turn_s * SAMPLE_RATE) if turn_s > 0 else 0
        self.endpoint_samples = int(endpoint_s * SAMPLE_RATE) if endpoint_s > 0 else 0
        self.min_speech_frames = max(1, min_speech_frames)
        self.frames = 0
        self.span: SpeechSpan | None = None
        """Speech so far (first speech sample → end of the last speech frame); None: none yet."""
        self.speaking = False
        self._run = 0
        self._run_start = 0
        self._paused_sent = False
        self._turn_sent = False
        self._endpoint_sent = False

    @property
    def position(self) -> int:
        """Samples consumed so far."""
        return self.frames * FRAME_SAMPLES

    @property
    def silence_samples(self) -> int:
        """Silence since the end of the last speech (0 while speaking or before speech)."""
        if self.span is None or self.speaking:
            return 0
        return self.position - self.span.end

    def update(self, probability: float) -> list[VadEvent]:
        """Consume one frame's probability; return what it changed."""
        start = self.position
        self.frames += 1
        end = self.position
        events: list[VadEvent] = []
        if self.speaking:
            if probability >= self.negative_threshold:
                assert self.span is not None
                self.span = SpeechSpan(self.span.start, end)
                return events
            self.speaking = False
            self._run = 0
        if probability >= self.threshold:
            if self._run == 0:
                self._run_start = start
            self._run += 1
            if self._run >= self.min_speech_frames:
                self.speaking = True
                self._run = 0
                resumed = self.span is None or self._paused_sent or self._turn_sent
                first = self.span.start if self.span is not None else self._run_start
                self.span = SpeechSpan(first, end)
                if resumed:  # a dip shorter than the pause is still the same speech
                    self._paused_sent = False
                    self._turn_sent = False
                    self._endpoint_sent = False
                    events.append(VadEvent.STARTED)
            return events
        self._run = 0
        silence = self.silence_samples
        if self.span is None:
            return events
        if self.pause_samples and not self._paused_sent and silence >= self.pause_samples:
            self._paused_sent = True
            events.append(VadEvent.PAUSED)
        if self.turn_samples and not self._turn_sent and silence >= self.turn_samples:
            self._turn_sent = True
            events.append(VadEvent.TURN)
        if self.endpoint_samples and not self._endpoint_sent and silence >= self.endpoint_samples:
            self._endpoint_sent = True
            events.append(VadEvent.ENDPOINT)
        return events
