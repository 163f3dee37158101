"""Streaming Silero VAD: speech probabilities per 32 ms frame, and what they mean.

Two parts, kept apart so the decisions are testable without a model:

* :class:`SileroVad` / :class:`VadStream` run Silero on 512-sample frames at
  16 kHz as audio arrives. One ONNX session is shared by every stream (a
  session's ``run`` is thread-safe and stateless); each stream keeps its own
  recurrent state and 64-sample context, so a stream costs nothing to open.
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

_LOGGER = logging.getLogger(__name__)

FRAME_SAMPLES = 512
"""Silero's frame at 16 kHz (32 ms)."""
CONTEXT_SAMPLES = 64
"""Samples of the previous frame Silero prepends to each frame at 16 kHz."""
SAMPLE_RATE = 16000


class SileroVad:
    """The shared Silero model; :meth:`stream` opens a per-utterance detector."""

    def __init__(self) -> None:
        self._session: Any = None
        self._lock = threading.Lock()
        self.backend = ""
        self._workers = min(4, os.cpu_count() or 1)
        self._executor: ThreadPoolExecutor | None = None

    def load(self) -> None:
        """Load once (about 0.1 s); the ONNX model ships inside the ``silero_vad`` wheel."""
        with self._lock:
            if self.backend:
                return
            if importlib.util.find_spec("onnxruntime") is not None:
                import onnxruntime

                options = onnxruntime.SessionOptions()
                options.inter_op_num_threads = 1
                options.intra_op_num_threads = 1
                path = resources.files("silero_vad").joinpath("data/silero_vad.onnx")
                with resources.as_file(path) as model_file:
                    self._session = onnxruntime.InferenceSession(
                        str(model_file), sess_options=options, providers=["CPUExecutionProvider"]
                    )
                self.backend = "onnx"
            else:
                import silero_vad

                silero_vad.load_silero_vad()  # fail now, not on the first stream
                self.backend = "torch"
            _LOGGER.info("Silero VAD loaded (%s)", self.backend)

    def stream(self) -> VadStream:
        if not self.backend:
            self.load()
        if self.backend == "onnx":
            return VadStream(self._session, None)
        import silero_vad

        return VadStream(None, silero_vad.load_silero_vad())

    async def probabilities(self, stream: VadStream, samples: np.ndarray) -> list[float]:
        """``stream.process(samples)`` off the event loop when it completes a frame.

        A stream's chunks arrive one after the other on its connection, so its
        frames never run concurrently; different streams run in parallel
        (ONNX Runtime releases the GIL). Samples that complete no frame are
        only buffered, which needs no thread.
        """
        if not stream.completes_frame(len(samples)):
            return stream.process(samples)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self._workers, thread_name_prefix="silero-vad")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, stream.process, samples)

    def close(self) -> None:
        """Stop the worker threads: frames not yet started are dropped, a running one ends."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None


class VadStream:
    """Feeds 16 kHz samples of one stream to Silero; yields one probability per frame."""

    def __init__(self, session: Any, torch_model: Any) -> None:
        self._session = session
        self._torch_model = torch_model
        self._state = np.zeros((2, 1, 128), dtype=np.float32)
        self._context = np.zeros(CONTEXT_SAMPLES, dtype=np.float32)
        self._pending = np.zeros(0, dtype=np.float32)
        self._sr = np.array(SAMPLE_RATE, dtype=np.int64)

    def completes_frame(self, count: int) -> bool:
        """True when ``count`` more samples complete at least one frame."""
        return len(self._pending) + count >= FRAME_SAMPLES

    def process(self, samples: np.ndarray) -> list[float]:
        """Speech probability of every whole frame completed by ``samples``."""
        data = np.concatenate([self._pending, samples]) if len(self._pending) else samples
        whole = len(data) - len(data) % FRAME_SAMPLES
        self._pending = data[whole:].copy()
        return [self._frame(data[start : start + FRAME_SAMPLES]) for start in range(0, whole, FRAME_SAMPLES)]

    def _frame(self, frame: np.ndarray) -> float:
        if self._torch_model is not None:
            import torch

            with torch.no_grad():
                return float(
                    self._torch_model(torch.from_numpy(frame.astype(np.float32)), SAMPLE_RATE).item()
                )
        joined = np.concatenate([self._context, frame]).astype(np.float32)[np.newaxis, :]
        output, state = self._session.run(None, {"input": joined, "state": self._state, "sr": self._sr})
        self._state = state
        self._context = joined[0, -CONTEXT_SAMPLES:]
        return float(output[0][0])


class VadEvent(enum.Enum):
    STARTED = "started"
    """Speech began (first time, or again after a pause that was reported)."""
    PAUSED = "paused"
    """Speech has been followed by ``pause_s`` of silence: time to decode speculatively."""
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
    the last speech frame.
    """

    def __init__(
        self,
        threshold: float = 0.5,
        *,
        pause_s: float = 0.3,
        endpoint_s: float = 0.0,
        min_speech_frames: int = 3,
    ) -> None:
        self.threshold = threshold
        self.negative_threshold = max(0.0, threshold - 0.15)
        self.pause_samples = int(pause_s * SAMPLE_RATE) if pause_s > 0 else 0
        self.endpoint_samples = int(endpoint_s * SAMPLE_RATE) if endpoint_s > 0 else 0
        self.min_speech_frames = max(1, min_speech_frames)
        self.frames = 0
        self.span: SpeechSpan | None = None
        """Speech so far (first speech sample → end of the last speech frame); None: none yet."""
        self.speaking = False
        self._run = 0
        self._run_start = 0
        self._paused_sent = False
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
                resumed = self.span is None or self._paused_sent
                first = self.span.start if self.span is not None else self._run_start
                self.span = SpeechSpan(first, end)
                if resumed:  # a dip shorter than the pause is still the same speech
                    self._paused_sent = False
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
        if self.endpoint_samples and not self._endpoint_sent and silence >= self.endpoint_samples:
            self._endpoint_sent = True
            events.append(VadEvent.ENDPOINT)
        return events
