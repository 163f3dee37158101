"""GPU memory hygiene: watch VRAM around each request, act above the high watermark.

CTranslate2, llama.cpp and ONNX Runtime allocate outside torch, so the only
truthful figure is NVML's. Each request's VRAM delta is recorded; when memory
in use stays above ``gpu.vram_high_watermark`` after freeing caches, the
lowest-quality loaded GPU engine of any chain in the process is unloaded (it
loads again on its next use). On a CPU-only machine this is a no-op.
"""

from __future__ import annotations

import gc
import logging
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .gpu import GpuDecision, GpuTelemetry, read_telemetry

if TYPE_CHECKING:
    from .fallback import FallbackChain
    from .metrics import Metrics

_LOGGER = logging.getLogger(__name__)


def free_caches() -> None:
    """Return cached blocks to the driver where a library keeps a cache (torch's allocator)."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


class VramGuard:
    """One per process; every chain registers itself so the guard can unload across services."""

    def __init__(
        self,
        decision: GpuDecision,
        metrics: Metrics | None,
        watermark: float,
        *,
        telemetry: Callable[[], GpuTelemetry | None] | None = None,
        free: Callable[[], None] = free_caches,
    ) -> None:
        self.enabled = decision.on_gpu or telemetry is not None
        gpu = decision.gpu
        self._telemetry = telemetry or (lambda: read_telemetry(gpu) if gpu is not None else None)
        self.metrics = metrics
        self.watermark = watermark
        self.free = free
        self.chains: list[FallbackChain[Any]] = []

    def register(self, chain: FallbackChain[Any]) -> None:
        self.chains.append(chain)

    def before(self) -> int | None:
        if not self.enabled:
            return None
        reading = self._telemetry()
        return reading.used_bytes if reading else None

    async def after(self, service: str, used_before: int | None) -> None:
        """Record the request's VRAM delta; free memory when above the watermark."""
        if not self.enabled:
            return
        reading = self._telemetry()
        if reading is None:
            return
        if used_before is not None and self.metrics is not None:
            self.metrics.vram_delta.labels(service).observe(reading.used_bytes - used_before)
        if reading.used_bytes <= self.watermark * reading.total_bytes:
            return
        _LOGGER.warning(
            "GPU memory %.0f%% above the %.0f%% watermark: freeing caches",
            100 * reading.used_bytes / reading.total_bytes,
            100 * self.watermark,
        )
        self.free()
        self._count("free_cache")
        reading = self._telemetry()
        if reading is None or reading.used_bytes <= self.watermark * reading.total_bytes:
            return
        victim = self._lowest_priority_gpu_level()
        if victim is None:
            _LOGGER.warning("GPU memory still high and no GPU engine to unload")
            return
        chain, index = victim
        _LOGGER.warning("GPU memory still high: unloading %s", chain.levels[index].engine.name)
        await chain.unload(index)
        self._count("unload")

    def _lowest_priority_gpu_level(self) -> tuple[FallbackChain[Any], int] | None:
        candidates = [
            (level.engine.quality, -index, chain, index)
            for chain in self.chains
            for index, level in enumerate(chain.levels)
            if level.loaded and level.engine.device.startswith("cuda")
        ]
        if not candidates:
            return None
        _, _, chain, index = min(candidates, key=lambda c: (c[0], c[1]))
        return chain, index

    def _count(self, action: str) -> None:
        if self.metrics is not None:
            self.metrics.gpu_hygiene.labels(action).inc()
