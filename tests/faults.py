"""An engine that fails the way native code does, for the worker-supervision tests.

It runs in a real worker process (``runtime.worker``) and kills that process
as a broken llama.cpp, CTranslate2 or ONNX Runtime build would: a SIGSEGV to
itself, ``abort()``, a call that never returns (the event loop blocked, as a
native call holding the GIL does), or a long call the test SIGKILLs from
outside (the OOM killer). With a ``marker`` path it crashes only while the
marker does not exist, so a restarted worker serves (the level comes back).
It speaks all three work calls (ASR ``transcribe``, handle ``stream``, TTS
``synthesize``) so one class covers the three services.
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
import struct
import threading
import time
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

MODES = ("segv", "abort", "hang", "slow", "ok")


class CrashingEngine:
    """``mode``: segv | abort | hang | slow (sleeps ``slow_s``, to be killed) | ok."""

    device = "cpu"
    quality = 5
    languages = ("fr", "en")
    model_name = "crashing"
    model = "crashing"
    native_rate = 22050
    supports_tools = False

    def __init__(
        self,
        mode: str,
        *,
        name: str = "crashing",
        marker: str = "",
        crash_on_load: bool = False,
        slow_s: float = 30.0,
        text: str = "Bonjour, je suis revenu.",
    ) -> None:
        assert mode in MODES, mode
        self.mode = mode
        self.name = name
        self.marker = marker
        self.crash_on_load = crash_on_load
        self.slow_s = slow_s
        self.text = text
        self.calls = 0

    async def load(self) -> None:
        if self.crash_on_load:
            self._fail()

    async def close(self) -> None:
        return None

    def _fail(self) -> None:
        if self.marker:
            if Path(self.marker).exists():
                return
            Path(self.marker).touch()
        if self.mode == "segv":
            os.kill(os.getpid(), signal.SIGSEGV)
            time.sleep(5)
        elif self.mode == "abort":
            os.abort()
        elif self.mode == "hang":
            time.sleep(3600)  # blocks the worker's event loop: it cannot even hear "cancel"

    async def _work(self) -> None:
        self.calls += 1
        self._fail()
        if self.mode == "slow":
            await asyncio.sleep(self.slow_s)

    # ASR
    async def transcribe(self, request: Any, cancel: threading.Event | None = None) -> Any:
        from wyoming_superwhisper.asr.engines import AsrResult

        await self._work()
        return AsrResult(text=self.text, language=request.language or "fr", engine=self.name)

    # handle
    async def stream(self, request: Any) -> AsyncGenerator[Any, None]:
        from wyoming_superwhisper.handle.engines import ChatDelta

        await self._work()
        words = self.text.split(" ")
        for index, word in enumerate(words):
            yield ChatDelta(word if index == 0 else " " + word)
        yield ChatDelta("", "stop")

    # TTS
    async def synthesize(self, text: str, options: Any) -> Any:
        from wyoming_superwhisper.tts.engines import Audio

        await self._work()
        seconds = max(0.5, len(text) / 15)
        samples = int(self.native_rate * seconds)
        pcm = b"".join(
            struct.pack("<h", int(8000 * math.sin(2 * math.pi * 220 * i / self.native_rate)))
            for i in range(samples)
        )
        return Audio(pcm, self.native_rate, self.name)

    def speakers(self) -> tuple[str, ...]:
        return ()
