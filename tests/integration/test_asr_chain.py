"""From configured levels to engines: devices, compute types, remote levels, describe's models."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from tests.conftest import make_settings
from wyoming_superwhisper.asr.engines import RemoteWyomingEngine, WhisperEngine
from wyoming_superwhisper.asr.service import AsrService, build_engines
from wyoming_superwhisper.runtime.gpu import GpuDecision, GpuDevice, choose_gpu
from wyoming_superwhisper.runtime.metrics import Metrics
from wyoming_superwhisper.runtime.registry import ModelRegistry
from wyoming_superwhisper.runtime.server import ServiceContext
from wyoming_superwhisper.runtime.worker import EngineWorker

CHAIN = [
    {"model": "whisper-large-v3-turbo", "device": "cuda"},
    {"model": "whisper-base", "device": "cuda"},
    {"model": "whisper-base", "device": "cpu"},
    {"remote": "tcp://127.0.0.1:10399"},
]


def context(decision: GpuDecision | None = None) -> ServiceContext:
    settings = make_settings(**{"asr.chain": CHAIN})
    return ServiceContext(
        settings,
        ModelRegistry.from_settings(settings),
        decision or choose_gpu(None, settings.gpu),
        Metrics(CollectorRegistry()),
    )


def test_cpu_machine_keeps_the_cpu_and_remote_levels() -> None:
    engines, models = build_engines(context())
    assert [e.name for e in engines] == ["faster-whisper:whisper-base@cpu", "wyoming:127.0.0.1:10399"]
    whisper, remote = engines
    assert isinstance(whisper, EngineWorker)  # native: in a supervised worker process
    assert isinstance(whisper.engine, WhisperEngine) and whisper.compute_type == "int8"
    assert isinstance(remote, RemoteWyomingEngine) and remote.device == "remote"
    assert [m.name for m in models] == ["whisper-base", "tcp://127.0.0.1:10399"]


def test_gpu_levels_take_float16_on_cuda_0() -> None:
    # A GPU cannot exist here: the decision is the only fake, the registry is real.
    gpu = GpuDevice(0, "NVIDIA GeForce RTX 3090", 24 * 10**9, "00000000:01:00.0")
    engines, models = build_engines(context(GpuDecision("cuda:0", gpu, "test")))
    by_name = {e.name: e for e in engines}
    cuda = by_name["faster-whisper:whisper-base@cuda:0"]
    assert isinstance(cuda, EngineWorker) and isinstance(cuda.engine, WhisperEngine)
    assert cuda.compute_type == "float16"
    cpu = by_name["faster-whisper:whisper-base@cpu"]
    assert isinstance(cpu, EngineWorker) and isinstance(cpu.engine, WhisperEngine)
    assert cpu.compute_type == "int8"
    # large-v3-turbo is not installed here: listed, but not installed (Home Assistant hides it).
    assert [(m.name, m.installed) for m in models] == [
        ("whisper-base", True),
        ("tcp://127.0.0.1:10399", True),
        ("whisper-large-v3-turbo", False),
    ]


def test_describe_needs_external_vad_only_without_endpointing() -> None:
    plain = AsrService(context())
    assert plain.info_event.data["asr"][0]["requires_external_vad"] is True
    settings = make_settings(**{"asr.chain": CHAIN, "asr.endpointing_s": 0.7})
    ctx = ServiceContext(
        settings,
        ModelRegistry.from_settings(settings),
        choose_gpu(None, settings.gpu),
        Metrics(CollectorRegistry()),
    )
    assert AsrService(ctx).info_event.data["asr"][0]["requires_external_vad"] is False
