"""The doctor against real services: it judges what it heard, and a crashing engine is a broken line.

The doctor starts the real ASR (whisper base), handle and TTS services, sends
each one real request and reads the TTS audio back through the ASR. A
handle level that segfaults in its worker (:class:`tests.faults.CrashingEngine`)
must show as a broken level naming the signal, while the doctor itself, in
this very process, goes on to the end.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import make_context, make_settings, requires_espeak
from tests.faults import CrashingEngine
from wyoming_superwhisper.asr.service import AsrService
from wyoming_superwhisper.doctor import Status, run_doctor
from wyoming_superwhisper.handle.service import HandleService
from wyoming_superwhisper.runtime.server import ServiceContext
from wyoming_superwhisper.runtime.worker import WorkerOptions, supervised
from wyoming_superwhisper.tts.service import TtsService

pytestmark = [requires_espeak, pytest.mark.slow]


async def test_doctor_reports_a_crashing_level_and_judges_the_read_back() -> None:
    settings = make_settings()
    context = make_context(settings)
    crashing = supervised(
        WorkerOptions(restart_backoff_s=0.1), CrashingEngine, "segv", name="llama-cpp:broken@cpu",
        streams=("stream",),
    )  # fmt: skip

    def handle(ctx: ServiceContext) -> HandleService:
        real = HandleService(ctx)  # the configured chain: SmolLM2 on the CPU
        return HandleService(ctx, engines=[crashing, *real.chain.engines])

    factories: dict[str, Any] = {"asr": AsrService, "handle": handle, "tts": TtsService}
    report = await run_doctor(
        settings, context.registry, context.gpu, list(factories), context=context, factories=factories
    )
    checks = {(c.area, c.name): c for c in report.checks}
    crash = checks[("handle", "level 0 llama-cpp:broken@cpu")]
    assert crash.status is Status.BROKEN
    assert "SIGSEGV" in crash.detail and "llama-cpp-python built with" in crash.detail
    assert checks[("handle", "smoke")].status is Status.OK  # SmolLM2 answered after the crash
    asr_smoke = checks[("asr", "smoke")]
    assert asr_smoke.status is Status.OK and "WER" in asr_smoke.detail, asr_smoke.detail
    read_back = checks[("tts", "read back")]
    assert read_back.status in (Status.OK, Status.DEGRADED)
    assert "kokoro-ff_siwis said 'Il est dix heures et demie.'" in read_back.detail, read_back.detail
    assert "WER" in read_back.detail
    assert report.status is Status.BROKEN and report.exit_code == 2


async def test_a_fresh_install_speaks_french_with_kokoro_and_is_not_degraded() -> None:
    """The packaged defaults on what the setup installed: the French chain is all ok."""
    settings = make_settings()
    context = make_context(settings)
    report = await run_doctor(settings, context.registry, context.gpu, ["tts"])  # static checks
    french = [c for c in report.checks if c.name.startswith("tts.voices.fr")]
    assert french and all(c.status is Status.OK for c in french), french
    assert any("kokoro-ff_siwis on cpu" in c.detail for c in french)
    assert any("optional" in c.detail for c in french)  # the Piper French voice, not fetched
    assert report.status is Status.OK
