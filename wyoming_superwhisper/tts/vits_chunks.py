"""Chunked VITS decoding: a Piper voice's first audio before its sentence is rendered.

A Piper voice is one ONNX graph: text encoder, duration predictor and flow
turn phoneme ids into a latent ``z`` of shape ``[1, C, frames]``, then a
HiFi-GAN decoder turns ``z`` into audio, ``hop`` samples per frame. The
decoder is about two thirds of the work and is convolutional: a sample only
depends on a bounded window of frames around it. So the graph is cut at the
decoder's input (:func:`find_cut`, by node names as Piper's exporter writes
them: ``/dec/...``) into an *encoder* (ids → ``z``, plus the speaker
embedding of a multi-speaker voice) and a *decoder* (``z`` → audio). The
encoder runs once per sentence, the decoder on chunks of ``z`` with
``context`` frames on each side whose samples are dropped (the fewest that
match the one-shot decode, measured at load on the decoder): on
en_US-joe-medium, 12 frames of context already give the one-shot decode to
1e-6 (SNR > 120 dB), 8 frames 65 dB, 4 frames 28 dB (an audible click).

The two parts are extracted with the ``onnx`` package once per voice file and
cached under the registry's cache directory, keyed by the file's sha256.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..runtime.registry import file_sha256

_LOGGER = logging.getLogger(__name__)

SPLIT_VERSION = 2
"""Bumped when the extraction changes, so cached parts built the old way are rebuilt."""
DECODER_PREFIX = "/dec/"
"""Node names of the HiFi-GAN decoder in Piper's (PyTorch) export."""
CONTEXT_CANDIDATES = (4, 8, 12, 16, 24, 32)
CONTEXT_TOLERANCE = 1e-4
"""Largest sample difference (full scale 1) a chunk may have with the one-shot decode: -80 dBFS."""
FIRST_FRAMES = 16
"""First chunk: about 0.19 s of audio at hop 256 / 22.05 kHz, decoded in about 15 ms here."""
GROWTH = 8.0
""":func:`chunk_plan`'s growth when the decoder's speed is not measured yet."""
MAX_FRAMES = 1024
"""No chunk longer than this (about 12 s of audio)."""
SAFETY = 0.5
"""A chunk is sized to be decoded in this share of the audio still buffered ahead of the
listener, at the decoder's measured speed: the audio never runs dry, in few runs."""


CALIBRATION_TEXTS = {
    "fr": (
        "Il est dix heures et demie.",
        "J'ai allumé la lumière du salon, et la température est de vingt et un degrés.",
        "Attention ! Le minuteur de cinq minutes est terminé.",
    ),
    "en": (
        "It is half past ten.",
        "I turned on the living room light, and the temperature is twenty one degrees.",
        "Attention! The five minute timer is done.",
    ),
}
"""Sentences whose loudest peak sets a chunked voice's fixed gain, by espeak language."""


def calibration_texts(espeak_voice: str) -> tuple[str, ...]:
    """The calibration sentences for a voice's espeak language (``fr``, ``en-us``...); English else."""
    return CALIBRATION_TEXTS.get(espeak_voice.split("-")[0].lower(), CALIBRATION_TEXTS["en"])


class SplitError(Exception):
    """The voice's graph cannot be cut at its decoder's input (not a graph as Piper exports it)."""


@dataclass(frozen=True)
class SplitGraph:
    """A voice's graph cut at its decoder's input: two ONNX files on disk."""

    encoder: Path
    """Phoneme ids (and scales, speaker) → ``latent`` (and ``extra``)."""
    decoder: Path
    """``latent`` (and ``extra``) → audio."""
    latent: str
    """Name of ``z`` (the decoder's first Conv's input)."""
    extra: tuple[str, ...]
    """Other decoder inputs the encoder also outputs (a multi-speaker voice's ``g``)."""


def find_cut(model: Any) -> tuple[str, tuple[str, ...]]:
    """``(z, other decoder inputs)`` of a VITS graph; :class:`SplitError` when there is no clean cut.

    The decoder is every node named ``/dec/...``; its inputs from outside (not its own
    tensors, not weights) are what the encoder must hand over. ``z`` is the input of
    its first Conv; the rest are conditioning tensors, constant along time.
    """
    graph = model.graph
    nodes = [node for node in graph.node if node.name.startswith(DECODER_PREFIX)]
    if not nodes:
        raise SplitError(f"no decoder node named {DECODER_PREFIX}* in the graph")
    produced = {name for node in nodes for name in node.output}
    weights = {init.name for init in graph.initializer}
    external: list[str] = []
    for node in nodes:
        for name in node.input:
            if name and name not in produced and name not in weights and name not in external:
                external.append(name)
    convs = [node for node in nodes if node.op_type == "Conv"]
    if not convs:
        raise SplitError("the decoder has no Conv")
    latent = convs[0].input[0]
    if latent not in external:
        raise SplitError(f"the decoder's first Conv reads {latent!r}, computed inside the decoder")
    graph_inputs = {value.name for value in graph.input}
    if any(name in graph_inputs for name in external):
        raise SplitError("the decoder reads a graph input directly")
    outside = [n for n in graph.node if not n.name.startswith(DECODER_PREFIX)]
    for node in outside:  # only the output's reshaping may follow the decoder
        if any(name in produced for name in node.input) and node.op_type not in ("Unsqueeze", "Squeeze"):
            raise SplitError(f"{node.name} ({node.op_type}) reads the decoder's tensors")
    return latent, tuple(name for name in external if name != latent)


def split_voice(model_path: Path, cache_root: Path) -> SplitGraph:
    """The voice's graph cut at its decoder's input, built once and cached by the file's sha256."""
    import onnx
    from onnx.utils import Extractor

    sha = file_sha256(model_path)
    folder = cache_root / f"{model_path.stem}-{sha[:16]}-v{SPLIT_VERSION}"
    meta_path = folder / "split.json"
    encoder, decoder = folder / "encoder.onnx", folder / "decoder.onnx"
    try:
        meta = json.loads(meta_path.read_text("utf-8"))
        if meta.get("sha256") == sha and encoder.is_file() and decoder.is_file():
            return SplitGraph(encoder, decoder, str(meta["latent"]), tuple(meta["extra"]))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    model = onnx.shape_inference.infer_shapes(onnx.load(str(model_path)))  # typed cut tensors
    latent, extra = find_cut(model)
    inputs = [value.name for value in model.graph.input]
    extractor = Extractor(model)
    encoder_model = extractor.extract_model(inputs, [latent, *extra])
    decoder_model = extractor.extract_model([latent, *extra], [model.graph.output[0].name])
    decoder_inputs = [value.name for value in decoder_model.graph.input]
    if decoder_inputs != [latent, *extra]:
        raise SplitError(f"the decoder part needs {decoder_inputs}, not only {[latent, *extra]}")
    folder.mkdir(parents=True, exist_ok=True)
    _atomic_write(encoder, encoder_model.SerializeToString())
    _atomic_write(decoder, decoder_model.SerializeToString())
    meta = {
        "version": SPLIT_VERSION,
        "sha256": sha,
        "latent": latent,
        "extra": list(extra),
        "source": str(model_path),
    }
    _atomic_write(meta_path, json.dumps(meta, indent=1).encode("utf-8"))
    _LOGGER.info("split %s at %s into %s", model_path.name, latent, folder)
    return SplitGraph(encoder, decoder, latent, extra)


def _atomic_write(path: Path, data: bytes) -> None:
    """Write then rename: two workers building the same voice never read half a file."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def chunk_plan(
    frames: int, first: int = FIRST_FRAMES, growth: float = GROWTH, largest: int = MAX_FRAMES
) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` covering ``frames``: a small first chunk, then growing ones.

    The fixed plan of :meth:`ChunkedVits.chunks`; a served voice sizes its chunks
    from the decoder's measured speed instead (:class:`ChunkPlanner`). A last piece
    shorter than the first chunk is merged into the one before it.
    """
    plan: list[tuple[int, int]] = []
    start, size = 0, max(1, first)
    while start < frames:
        end = min(frames, start + size)
        if frames - end < max(1, first) and end < frames:
            end = frames
        plan.append((start, end))
        start = end
        size = min(max(1, largest), max(size + 1, int(size * growth)))
    return plan


class ChunkPlanner:
    """Sizes a sentence's chunks as they are decoded: a small first one, then each as
    long as the decoder can render in :data:`SAFETY` of the audio still ahead of the
    listener, at the speed it just showed. Fewer runs mean less context decoded twice
    (the total time), and a slow CPU still never lets the audio run dry.
    """

    def __init__(
        self,
        frames: int,
        seconds_per_frame: float,
        context: int,
        *,
        first: int = FIRST_FRAMES,
        largest: int = MAX_FRAMES,
        clock: Any = time.monotonic,
    ) -> None:
        self.frames = frames
        self.seconds_per_frame = seconds_per_frame
        self.context = context
        self.first = max(1, first)
        self.largest = max(self.first, largest)
        self._clock = clock
        self._position = 0
        self._speed = 0.0
        """Frames the decoder renders per second (context included), from the last chunk."""
        self._audio = 0.0
        self._since: float | None = None

    def next(self) -> tuple[int, int] | None:
        """The next chunk ``(start, end)``, or None when the sentence is done."""
        start = self._position
        if start >= self.frames:
            return None
        if self._since is None or self._speed <= 0:
            size = self.first
        else:
            ahead = self._audio - (self._clock() - self._since)
            size = int(self._speed * max(ahead, 0.0) * SAFETY) - 2 * self.context
            size = max(self.first, min(self.largest, size))
        end = min(self.frames, start + size)
        if self.frames - end < max(self.first, size // 2):
            end = self.frames  # a short remainder is not worth another run and its context
        return start, end

    def decoded(self, start: int, end: int, seconds: float) -> None:
        """Chunk ``[start, end)`` took ``seconds`` to decode, and its audio is on its way."""
        decoded = (end - start) + min(start, self.context) + min(self.frames - end, self.context)
        if seconds > 0:
            self._speed = decoded / seconds
        if self._since is None:
            self._since = self._clock()
        self._audio += (end - start) * self.seconds_per_frame
        self._position = end


@dataclass
class Latent:
    """One sentence's latent and conditioning, ready to decode."""

    z: np.ndarray
    extra: tuple[np.ndarray, ...]

    @property
    def frames(self) -> int:
        return int(self.z.shape[2])


class ChunkedVits:
    """The two sessions of a split voice: encode a sentence once, decode its latent in chunks."""

    def __init__(self, split: SplitGraph, providers: Sequence[Any]) -> None:
        import onnxruntime

        self.split = split
        # The encoder's pool does not spin: spinning threads left over from its run fought
        # the decoder's for the two cores (measured: one-shot 126 → 92 ms for a 2 s sentence).
        # The decoder keeps ONNX Runtime's defaults, as the whole voice does.
        quiet = onnxruntime.SessionOptions()
        quiet.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.encoder = onnxruntime.InferenceSession(str(split.encoder), quiet, providers=list(providers))
        self.decoder = onnxruntime.InferenceSession(str(split.decoder), providers=list(providers))
        self.encoder_inputs = {value.name for value in self.encoder.get_inputs()}
        decoder_inputs = {value.name: value for value in self.decoder.get_inputs()}
        shape = decoder_inputs[split.latent].shape
        channels = shape[1] if len(shape) == 3 else None
        if not isinstance(channels, int):
            raise SplitError(f"the decoder's input has no fixed channel count ({shape!r})")
        self.channels = channels
        self._extra_shapes = [_fixed(decoder_inputs[name].shape) for name in split.extra]
        self.hop = self._measure_hop()
        self.context = self.measure_context()

    def encode(self, feeds: dict[str, np.ndarray]) -> Latent:
        """Phoneme ids (``input``, ``input_lengths``, ``scales``, ``sid``) → the sentence's latent."""
        names = [self.split.latent, *self.split.extra]
        outputs = self.encoder.run(names, {k: v for k, v in feeds.items() if k in self.encoder_inputs})
        return Latent(outputs[0], tuple(outputs[1:]))

    def decode(
        self, latent: Latent, start: int = 0, end: int | None = None, context: int | None = None
    ) -> np.ndarray:
        """Float samples of frames ``[start, end)``, decoded with ``context`` frames each side, trimmed."""
        end = latent.frames if end is None else end
        context = self.context if context is None else context
        left = max(0, start - context)
        right = min(latent.frames, end + context)
        audio = self._run_decoder(Latent(latent.z[:, :, left:right], latent.extra))
        offset = (start - left) * self.hop
        return audio[offset : offset + (end - start) * self.hop]

    def _run_decoder(self, latent: Latent) -> np.ndarray:
        feeds = {self.split.latent: np.ascontiguousarray(latent.z)}
        feeds.update(zip(self.split.extra, latent.extra, strict=True))
        return np.asarray(self.decoder.run(None, feeds)[0]).reshape(-1)

    def chunks(self, latent: Latent, plan: Sequence[tuple[int, int]] | None = None) -> Iterator[np.ndarray]:
        for start, end in plan if plan is not None else chunk_plan(latent.frames):
            yield self.decode(latent, start, end)

    # -- facts measured on the decoder itself ------------------------------------------

    def _probe(self, frames: int, seed: int = 0) -> Latent:
        generator = np.random.default_rng(seed)
        z = generator.standard_normal((1, self.channels, frames)).astype(np.float32)
        extra = tuple(generator.standard_normal(shape).astype(np.float32) for shape in self._extra_shapes)
        return Latent(z, extra)

    def _measure_hop(self) -> int:
        """Samples per latent frame, from the decoder (the voice's config need not say)."""
        frames = 8
        samples = self._run_decoder(self._probe(frames)).size
        if samples % frames:
            raise SplitError(f"the decoder made {samples} samples from {frames} frames")
        return samples // frames

    def measure_context(self, tolerance: float = CONTEXT_TOLERANCE) -> int:
        """The fewest context frames whose chunked decode of a random latent equals the
        one-shot decode within ``tolerance`` (the decoder's receptive field, as it acts)."""
        probe = self._probe(96, seed=1)
        whole = self.decode(probe, context=0)
        for context in CONTEXT_CANDIDATES:
            piece = self.decode(probe, 40, 56, context=context)
            error = float(np.max(np.abs(piece - whole[40 * self.hop : 56 * self.hop])))
            if error <= tolerance:
                return context
        raise SplitError(
            f"chunks differ from the one-shot decode even with {CONTEXT_CANDIDATES[-1]} frames of context"
        )


def _fixed(shape: Sequence[Any]) -> list[int]:
    """A probe's shape: symbolic dimensions as 1."""
    return [dim if isinstance(dim, int) else 1 for dim in shape]
