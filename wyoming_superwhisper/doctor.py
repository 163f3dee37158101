"""The startup validator: GPU, config, models, and one real request per service.

``superwhisper doctor`` prints a table (``--json`` for machines) and exits
0 when all is well, 1 when degraded (a fallback will serve), 2 when broken.
``superwhisper serve`` runs the same checks and refuses to start when broken.
"""

from __future__ import annotations

import enum
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .config import ConfigError, EngineLevel, Settings
from .runtime.chains import ChainPlan, plan_chain
from .runtime.gpu import GpuDecision, verify_pinned
from .runtime.native import native_build_hint
from .runtime.registry import ModelRegistry, RegistryError
from .runtime.server import ServiceContext, WyomingService

_LOGGER = logging.getLogger(__name__)


class Status(enum.IntEnum):
    """Ordered by severity; the report's exit code is the worst status's code."""

    OK = 0
    DEGRADED = 1
    BROKEN = 2


@dataclass(frozen=True)
class Check:
    area: str
    """gpu, config, models, or a service name."""
    name: str
    status: Status
    detail: str


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)
    gpu: dict[str, Any] = field(default_factory=dict)

    def add(self, area: str, name: str, status: Status, detail: str) -> None:
        self.checks.append(Check(area, name, status, detail))

    @property
    def status(self) -> Status:
        return max((c.status for c in self.checks), default=Status.OK)

    @property
    def exit_code(self) -> int:
        return int(self.status)

    def to_json(self) -> str:
        return json.dumps(
            {
                "status": self.status.name.lower(),
                "exit_code": self.exit_code,
                "gpu": self.gpu,
                "checks": [{**asdict(c), "status": c.status.name.lower()} for c in self.checks],
            },
            indent=2,
            ensure_ascii=False,
        )

    def to_table(self) -> str:
        rows = [("AREA", "CHECK", "STATUS", "DETAIL")]
        rows += [(c.area, c.name, c.status.name.lower(), c.detail) for c in self.checks]
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = ["  ".join(r[i].ljust(widths[i]) for i in range(3)) + "  " + r[3] for r in rows]
        verdict = {
            Status.OK: "all good",
            Status.DEGRADED: "degraded: a fallback will serve",
            Status.BROKEN: "broken: fix the lines marked broken",
        }[self.status]
        lines.append(f"\n{verdict} (exit {self.exit_code})")
        return "\n".join(lines)


def service_chains(settings: Settings, service: str) -> dict[str, tuple[EngineLevel, ...]]:
    """The configured chains of one service, by config key."""
    if service == "asr":
        return {"asr.chain": settings.asr.chain}
    if service == "handle":
        return {"handle.chain": settings.handle.chain}
    if service == "tts":
        return {f"tts.voices.{lang}": levels for lang, levels in settings.tts.voices.items()}
    raise ValueError(f"unknown service {service!r}")


def check_gpu(report: Report, decision: GpuDecision, *, torch_check: bool = True) -> None:
    report.gpu = decision.as_dict()
    if decision.on_gpu:
        problems = verify_pinned(decision) if torch_check else []
        if problems:
            report.add("gpu", "pinning", Status.BROKEN, "; ".join(problems))
        else:
            report.add("gpu", "pinning", Status.OK, decision.reason)
    else:
        report.add("gpu", "device", Status.OK, f"none → CPU ({decision.reason})")


def check_chains(
    report: Report,
    settings: Settings,
    registry: ModelRegistry,
    decision: GpuDecision,
    services: Sequence[str],
) -> dict[str, ChainPlan]:
    """Plan every chain: config coherence and model presence."""
    plans: dict[str, ChainPlan] = {}
    for service in services:
        for key, levels in service_chains(settings, service).items():
            try:
                plan = plan_chain(key, levels, registry, decision)
            except ConfigError as error:
                report.add("config", key, Status.BROKEN, str(error))
                continue
            plans[key] = plan
            for skipped in plan.skipped:
                status = Status.DEGRADED if skipped.degraded else Status.OK
                report.add(
                    "config", skipped.key, status, f"{_level_name(skipped.level)} skipped: {skipped.reason}"
                )
            if plan.broken:
                report.add("config", key, Status.BROKEN, "no usable level: this service cannot answer")
            for planned in plan.levels:
                if planned.model is None:
                    report.add("models", planned.key, Status.OK, f"remote {planned.level.remote}")
                    continue
                problems = registry.verify(planned.model.spec.ref)
                status = (
                    Status.OK
                    if not problems
                    else (Status.BROKEN if len(plan.levels) == 1 else Status.DEGRADED)
                )
                detail = (
                    f"{planned.model.spec.ref} on {planned.device}: "
                    f"{planned.model.path} ({planned.model.origin})"
                    if not problems
                    else f"{planned.model.spec.ref}: " + "; ".join(problems)
                )
                report.add("models", planned.key, status, detail)
    return plans


def check_turn_model(report: Report, settings: Settings, registry: ModelRegistry) -> None:
    """The end-of-turn model, when the ASR ends turns semantically; missing, the ASR
    still works but waits ``asr.endpointing_s`` of silence each time (degraded)."""
    from .asr.turn import SMART_TURN_REF

    asr = settings.asr
    if asr.endpointing != "semantic" or asr.endpointing_s <= 0:
        return
    fallback = f"utterances end after asr.endpointing_s ({asr.endpointing_s:g} s) of silence"
    try:
        resolved = registry.resolve(SMART_TURN_REF)
        problems = registry.verify(SMART_TURN_REF)
    except RegistryError as error:
        problems = [str(error)]
        resolved = None
    if problems or resolved is None:
        fetch = f"superwhisper models fetch {SMART_TURN_REF}"
        detail = f"{SMART_TURN_REF}: {'; '.join(problems)}; {fallback} ({fetch})"
        report.add("models", "asr.endpointing", Status.DEGRADED, detail)
        return
    report.add("models", "asr.endpointing", Status.OK, f"semantic: {SMART_TURN_REF} at {resolved.path}")


READ_BACK_MAX_WER = 0.5
"""The TTS smoke's audio, read back by the ASR: above this WER the voice is not understood."""


async def check_services(
    report: Report,
    context: ServiceContext,
    factories: dict[str, Callable[[ServiceContext], WyomingService]],
    *,
    load_all_levels: bool,
) -> None:
    """Start each service for real, optionally load every level, and run its smoke request;
    then have the ASR read back what the TTS said."""
    started_services: dict[str, WyomingService] = {}
    try:
        for name, factory in factories.items():
            started = time.perf_counter()
            try:
                service = factory(context)
            except ConfigError as error:
                report.add(name, "build", Status.BROKEN, str(error))
                continue
            started_services[name] = service
            try:
                await service.start()
                if load_all_levels:
                    await _load_levels(report, name, service)
                result = await service.smoke()
                report.add(name, "smoke", Status.OK, f"{result} ({time.perf_counter() - started:.1f} s)")
            except Exception as error:  # the doctor reports every failure instead of stopping
                _LOGGER.debug("%s smoke failed", name, exc_info=True)
                report.add(name, "smoke", Status.BROKEN, f"{type(error).__name__}: {error}")
            _report_crashes(report, name, service)
            await _check_home(report, name, service)
        await _read_back(report, started_services)
    finally:
        for service in started_services.values():
            await service.stop()


HOME_BROKEN_REASONS = ("unauthorized", "not_configured")
"""What only the user can fix (the token, the MCP integration): broken; the rest (Home Assistant
down or slow right now) is degraded, the handle still answers in words."""


async def _check_home(report: Report, name: str, service: WyomingService) -> None:
    """With ``handle.hass_url``: does Home Assistant's MCP server answer, with this token?"""
    control = getattr(service, "home_control", None)
    if control is None:
        return
    await control.warm()
    reached = control.reached
    if reached.get("reachable"):
        report.add(name, "home assistant", Status.OK, f"MCP server answered: {reached['tools']} tools")
        return
    status = Status.BROKEN if reached.get("reason") in HOME_BROKEN_REASONS else Status.DEGRADED
    report.add(name, "home assistant", status, f"cannot act on the home: {reached.get('detail')}")


async def _load_levels(report: Report, name: str, service: WyomingService) -> None:
    for chain in service.chains():
        for index, level in enumerate(chain.levels):
            ok = level.loaded or await chain.load(index)
            status = Status.OK if ok else (Status.DEGRADED if len(chain.levels) > 1 else Status.BROKEN)
            detail = "loads" if ok else f"does not load: {level.last_error}"
            report.add(name, f"load {level.engine.name}", status, detail)


def _report_crashes(report: Report, name: str, service: WyomingService) -> None:
    """A level whose worker died in native code is broken on this machine even when a later
    level answered the smoke: say which, and by what signal."""
    for chain in service.chains():
        for snapshot in chain.status():
            worker = snapshot["worker"]
            if worker and worker["crashes"]:
                report.add(
                    name,
                    f"level {snapshot['level']} {snapshot['engine']}",
                    Status.BROKEN,
                    f"worker crashed ({worker['last_crash']}) {worker['crashes']} time(s): "
                    f"native code failed on this machine ({native_build_hint(snapshot['engine'])})",
                )


async def _read_back(report: Report, services: dict[str, WyomingService]) -> None:
    """Is the TTS understood? The ASR transcribes the TTS smoke's audio, judged by its WER."""
    asr, tts = services.get("asr"), services.get("tts")
    said = getattr(tts, "smoke_audio", None)
    if asr is None or said is None or not hasattr(asr, "read_back"):
        return
    audio, text, language = said
    try:
        samples = np.frombuffer(audio.resampled(16000).pcm, dtype="<i2").astype(np.float32) / 32768.0
        heard, wer, engine = await asr.read_back(samples, text, language)
    except Exception as error:  # the ASR failed: its own smoke line says why
        report.add("tts", "read back", Status.DEGRADED, f"the ASR could not read it back: {error}")
        return
    status = Status.OK if wer <= READ_BACK_MAX_WER else Status.DEGRADED
    verdict = "understood" if status is Status.OK else "hard to understand"
    report.add(
        "tts",
        "read back",
        status,
        f"{audio.engine} said {text!r}, {engine} heard {heard!r}: WER {wer:.2f} "
        f"({'≤' if status is Status.OK else '>'} {READ_BACK_MAX_WER:g}, {verdict})",
    )


async def run_doctor(
    settings: Settings,
    registry: ModelRegistry,
    decision: GpuDecision,
    services: Sequence[str],
    *,
    context: ServiceContext | None = None,
    factories: dict[str, Callable[[ServiceContext], WyomingService]] | None = None,
    load_all_levels: bool = True,
) -> Report:
    """Static checks for ``services``; with a context and factories, also start each one."""
    report = Report()
    check_gpu(report, decision)
    plans = check_chains(report, settings, registry, decision, services)
    if "asr" in services:
        check_turn_model(report, settings, registry)
    if context is not None and factories:
        runnable = {
            name: factory
            for name, factory in factories.items()
            if all(key in plans and not plans[key].broken for key in service_chains(settings, name))
        }
        await check_services(report, context, runnable, load_all_levels=load_all_levels)
    return report


def _level_name(level: EngineLevel) -> str:
    return level.model or level.remote
