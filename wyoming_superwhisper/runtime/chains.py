"""From configured chain levels to a plan: which device, which model files, or why not.

Shared by the three services and the doctor, so that "a GPU level on a CPU
box", "a model that is not installed" and "an unknown ref" are judged the
same everywhere. A pure function of the config, the registry and the GPU
decision.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..config import ConfigError, EngineLevel
from .gpu import GpuDecision, resolve_device
from .registry import ModelMissing, ModelRegistry, ModelSpec, ResolvedModel, UnknownModel


@dataclass(frozen=True)
class PlannedLevel:
    """A chain level that can be built: its config, its device and its files."""

    key: str
    """Config key of the level, e.g. ``asr.chain[1]`` (for logs and errors)."""
    level: EngineLevel
    device: str
    """``cuda:0``, ``cpu`` or ``remote``."""
    model: ResolvedModel | None
    """None for a remote level."""

    @property
    def spec(self) -> ModelSpec | None:
        return self.model.spec if self.model is not None else None


@dataclass(frozen=True)
class SkippedLevel:
    key: str
    level: EngineLevel
    reason: str
    degraded: bool
    """True when the user lost something they configured (a missing model); False when
    the level does not apply here (a GPU level on a machine without an allowed GPU)."""


@dataclass(frozen=True)
class ChainPlan:
    key: str
    levels: tuple[PlannedLevel, ...]
    skipped: tuple[SkippedLevel, ...]

    @property
    def degraded(self) -> bool:
        return any(s.degraded for s in self.skipped)

    @property
    def broken(self) -> bool:
        return not self.levels


def plan_chain(
    key: str,
    levels: Sequence[EngineLevel],
    registry: ModelRegistry,
    decision: GpuDecision,
    *,
    config_source: str = "configuration",
) -> ChainPlan:
    """Plan one chain; an unknown model ref or a level with neither model nor remote is a
    :class:`ConfigError` naming the key."""
    planned: list[PlannedLevel] = []
    skipped: list[SkippedLevel] = []
    for index, level in enumerate(levels):
        level_key = f"{key}[{index}]"
        if bool(level.model) == bool(level.remote):
            raise ConfigError(level_key, config_source, "give exactly one of 'model' or 'remote'")
        if level.remote:
            planned.append(PlannedLevel(level_key, level, "remote", None))
            continue
        try:
            spec = registry.spec(level.model)
        except UnknownModel as error:
            raise ConfigError(f"{level_key}.model", config_source, str(error)) from error
        device = resolve_device(level.device, decision)
        if device is None:
            skipped.append(SkippedLevel(level_key, level, "needs a GPU, none pinned", degraded=False))
            continue
        if device.startswith("cuda") and decision.gpu is not None and spec.vram_mb:
            free_mb = decision.gpu.total_bytes / 1_000_000
            if spec.vram_mb > free_mb:
                skipped.append(
                    SkippedLevel(
                        level_key,
                        level,
                        f"needs {spec.vram_mb:.0f} MB of GPU memory, the GPU has {free_mb:.0f} MB",
                        degraded=False,
                    )
                )
                continue
        try:
            resolved = registry.resolve(level.model)
        except ModelMissing as error:
            # An optional model is an upgrade not fetched yet; any other is one the user lost.
            reason = f"{error} (optional)" if spec.optional else str(error)
            skipped.append(SkippedLevel(level_key, level, reason, degraded=not spec.optional))
            continue
        planned.append(PlannedLevel(level_key, level, device, resolved))
    return ChainPlan(key, tuple(planned), tuple(skipped))
