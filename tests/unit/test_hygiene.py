"""GPU memory hygiene with injected NVML readings (no GPU here)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from tests.unit.test_fallback import FakeEngine
from wyoming_superwhisper.runtime.fallback import FallbackChain
from wyoming_superwhisper.runtime.gpu import GpuDecision, GpuTelemetry
from wyoming_superwhisper.runtime.hygiene import VramGuard
from wyoming_superwhisper.runtime.metrics import Metrics

TOTAL = 24_000_000_000


class Readings:
    """A scripted sequence of NVML memory readings (bytes in use)."""

    def __init__(self, *used: int) -> None:
        self.used = list(used)
        self.calls = 0

    def __call__(self) -> GpuTelemetry:
        value = self.used[min(self.calls, len(self.used) - 1)]
        self.calls += 1
        return GpuTelemetry(value, TOTAL, 50.0, 60.0)


def make(readings: Readings) -> tuple[VramGuard, Metrics, list[str]]:
    metrics = Metrics(CollectorRegistry())
    freed: list[str] = []
    guard = VramGuard(
        GpuDecision("cpu", None, "test"), metrics, 0.9, telemetry=readings, free=lambda: freed.append("x")
    )
    return guard, metrics, freed


def value(metrics: Metrics, name: str, labels: dict[str, str]) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


async def test_delta_recorded_and_nothing_done_below_watermark() -> None:
    guard, metrics, freed = make(Readings(10_000_000_000, 12_000_000_000))
    chain = FallbackChain("asr", [FakeEngine("big", device="cuda:0")], memory=guard)
    await chain.run(lambda e: e.work("x"))
    # Histograms with negative buckets export no _sum: check the bucket the +2 GB delta fell in.
    assert (
        value(metrics, "superwhisper_gpu_request_vram_delta_bytes_bucket", {"service": "asr", "le": "1e+09"})
        == 0
    )
    assert (
        value(metrics, "superwhisper_gpu_request_vram_delta_bytes_bucket", {"service": "asr", "le": "4e+09"})
        == 1
    )
    assert freed == []


async def test_above_watermark_frees_caches_first() -> None:
    guard, metrics, freed = make(Readings(20e9, 23e9, 15e9))
    chain = FallbackChain("asr", [FakeEngine("big", device="cuda:0")], memory=guard)
    await chain.run(lambda e: e.work("x"))
    assert freed == ["x"]
    assert value(metrics, "superwhisper_gpu_hygiene_events_total", {"action": "free_cache"}) == 1
    assert chain.levels[0].loaded  # caches were enough


async def test_still_high_unloads_lowest_priority_gpu_engine_across_chains() -> None:
    guard, metrics, _ = make(Readings(20e9, 23e9, 23e9))
    asr = FallbackChain("asr", [FakeEngine("whisper-large", device="cuda:0", quality=5)], memory=guard)
    llm = FallbackChain(
        "handle",
        [FakeEngine("mistral", device="cuda:0", quality=3), FakeEngine("smol-cpu", device="cpu", quality=0)],
        memory=guard,
    )
    await llm.load(0)
    await llm.load(1)
    await asr.run(lambda e: e.work("x"))
    assert value(metrics, "superwhisper_gpu_hygiene_events_total", {"action": "unload"}) == 1
    assert llm.levels[0].loaded is False  # the lower-quality GPU engine went
    assert asr.levels[0].loaded and llm.levels[1].loaded  # CPU engines are never unloaded for VRAM


async def test_cpu_only_is_a_no_op() -> None:
    metrics = Metrics(CollectorRegistry())
    guard = VramGuard(GpuDecision("cpu", None, "no gpu"), metrics, 0.9)
    chain = FallbackChain("asr", [FakeEngine("small")], memory=guard)
    await chain.run(lambda e: e.work("x"))
    assert value(metrics, "superwhisper_gpu_request_vram_delta_bytes_count", {"service": "asr"}) == 0


def test_every_service_puts_its_chains_under_the_vram_guard() -> None:
    from tests.conftest import make_context
    from wyoming_superwhisper.asr.service import AsrService
    from wyoming_superwhisper.handle.service import HandleService
    from wyoming_superwhisper.tts.service import TtsService

    context = make_context()
    services = [AsrService(context), HandleService(context), TtsService(context)]
    assert context.vram is not None
    for service in services:
        for chain in service.chains():
            assert any(chain is registered for registered in context.vram.chains), chain.service
