"""The GPU guard: choose the one physical GPU policy allows, before any CUDA library loads.

This module is the only code in the project that reads or writes
``CUDA_VISIBLE_DEVICES`` / ``CUDA_DEVICE_ORDER``. It enumerates GPUs through
NVML (which creates no CUDA context and ignores those variables), picks one
by policy (name, memory, forbidden names), pins it in PCI bus order, and from
then on every engine says ``cuda:0`` or ``cpu``. The system this replaces set
``CUDA_VISIBLE_DEVICES`` file by file and ended up on the wrong card: the
decision is one pure function here, fed with facts, tested as a table.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..config import GpuSettings

_LOGGER = logging.getLogger(__name__)

VISIBLE_DEVICES = "CUDA_VISIBLE_DEVICES"
DEVICE_ORDER = "CUDA_DEVICE_ORDER"
GB = 1_000_000_000

CUDA_LIBRARIES = ("torch", "ctranslate2", "llama_cpp", "onnxruntime", "faster_whisper", "piper")
"""Modules that may open a CUDA context on import or first use: the guard must run first."""


class GpuPolicyError(Exception):
    """No allowed GPU and policy says fail, or the environment contradicts the policy."""


@dataclass(frozen=True)
class GpuDevice:
    """A physical GPU as NVML reports it; ``index`` is its rank in PCI bus order."""

    index: int
    name: str
    total_bytes: int
    pci_bus_id: str
    uuid: str = ""

    @property
    def total_gb(self) -> float:
        return self.total_bytes / GB

    def describe(self) -> str:
        return f"{self.name} ({self.total_gb:.1f} GB, PCI {self.pci_bus_id})"


@dataclass(frozen=True)
class GpuDecision:
    """The guard's verdict: the device string engines use, and why."""

    device: str
    """``cuda:0`` when a GPU is pinned, else ``cpu``."""
    gpu: GpuDevice | None
    reason: str
    environment: Mapping[str, str] = field(default_factory=dict)
    """Variables the guard sets (applied by :func:`apply`)."""
    rejected: tuple[tuple[str, str], ...] = ()
    """(GPU description, why it was not chosen) for each GPU passed over."""

    @property
    def on_gpu(self) -> bool:
        return self.gpu is not None

    def as_dict(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "gpu": None
            if self.gpu is None
            else {
                "name": self.gpu.name,
                "total_gb": round(self.gpu.total_gb, 1),
                "pci_bus_id": self.gpu.pci_bus_id,
                "index": self.gpu.index,
                "uuid": self.gpu.uuid,
            },
            "reason": self.reason,
            "environment": dict(self.environment),
            "rejected": [{"gpu": g, "why": why} for g, why in self.rejected],
        }


def enumerate_gpus() -> list[GpuDevice] | None:
    """Physical GPUs from NVML in PCI bus order; ``None`` when NVML is not available."""
    try:
        import pynvml
    except ImportError:
        _LOGGER.info("NVML bindings (nvidia-ml-py) not installed: no GPU")
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as error:
        _LOGGER.info("NVML not available (%s): no NVIDIA driver, running on CPU", error)
        return None
    try:
        found = []
        for handle_index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(handle_index)
            name = pynvml.nvmlDeviceGetName(handle)
            uuid = pynvml.nvmlDeviceGetUUID(handle)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            pci = pynvml.nvmlDeviceGetPciInfo(handle)
            bus_id = pci.busId
            found.append(
                (
                    _text(bus_id).lower(),
                    _text(name),
                    int(memory.total),
                    _text(uuid),
                )
            )
    finally:
        pynvml.nvmlShutdown()
    return devices_in_bus_order(found)


def devices_in_bus_order(found: Sequence[tuple[str, str, int, str]]) -> list[GpuDevice]:
    """(bus id, name, total bytes, uuid) tuples → devices indexed as CUDA's PCI_BUS_ID order."""
    ordered = sorted(found, key=lambda item: _normalize_bus_id(item[0]))
    return [
        GpuDevice(index=i, name=name, total_bytes=total, pci_bus_id=bus, uuid=uuid)
        for i, (bus, name, total, uuid) in enumerate(ordered)
    ]


def choose_gpu(devices: Sequence[GpuDevice] | None, policy: GpuSettings) -> GpuDecision:
    """Pure decision: which GPU (if any) the policy allows; raises when policy says fail."""
    if policy.device == "cpu":
        return _cpu("gpu.device is cpu")
    if not devices:
        reason = "no NVIDIA GPU found (NVML unavailable)" if devices is None else "NVML lists no GPU"
        return _mismatch(policy, reason, ())
    rejected: list[tuple[str, str]] = []
    allowed: list[GpuDevice] = []
    for device in devices:
        why = _why_not(device, policy)
        if why:
            rejected.append((device.describe(), why))
        else:
            allowed.append(device)
    if not allowed:
        summary = "; ".join(f"{gpu}: {why}" for gpu, why in rejected)
        return _mismatch(policy, f"no GPU satisfies the policy ({summary})", tuple(rejected))
    # Most memory first, then lowest bus: deterministic and the sensible choice for models.
    chosen = sorted(allowed, key=lambda d: (-d.total_bytes, d.index))[0]
    for device in allowed:
        if device is not chosen:
            rejected.append((device.describe(), f"allowed, but {chosen.name} was preferred"))
    environment = {DEVICE_ORDER: "PCI_BUS_ID", VISIBLE_DEVICES: str(chosen.index)}
    return GpuDecision(
        device="cuda:0",
        gpu=chosen,
        reason=f"pinned {chosen.describe()} as cuda:0",
        environment=environment,
        rejected=tuple(rejected),
    )


def _why_not(device: GpuDevice, policy: GpuSettings) -> str:
    for forbidden in policy.forbid_names:
        if forbidden and forbidden.lower() in device.name.lower():
            return f"name matches forbidden '{forbidden}'"
    if policy.require_name and policy.require_name.lower() not in device.name.lower():
        return f"name lacks required '{policy.require_name}'"
    if device.total_gb < policy.min_vram_gb:
        return f"{device.total_gb:.1f} GB < required {policy.min_vram_gb:g} GB"
    return ""


def _cpu(reason: str, rejected: tuple[tuple[str, str], ...] = ()) -> GpuDecision:
    # Hide every GPU, so that no library can grab one behind the guard's back.
    return GpuDecision("cpu", None, reason, {VISIBLE_DEVICES: ""}, rejected)


def _mismatch(policy: GpuSettings, reason: str, rejected: tuple[tuple[str, str], ...]) -> GpuDecision:
    if policy.on_mismatch == "fail":
        raise GpuPolicyError(f"{reason}; gpu.on_mismatch is fail")
    return _cpu(f"{reason}; running on CPU (gpu.on_mismatch: cpu)", rejected)


def environment_conflicts(decision: GpuDecision, environ: Mapping[str, str]) -> list[str]:
    """Variables already set that contradict the decision (a leftover ``CUDA_VISIBLE_DEVICES=1``)."""
    conflicts = []
    for name, wanted in decision.environment.items():
        current = environ.get(name)
        if current is None or current == wanted:
            continue
        if name == VISIBLE_DEVICES and decision.gpu is not None and current == decision.gpu.uuid:
            continue
        conflicts.append(f"{name}={current!r} is set, but the policy needs {name}={wanted!r}")
    if decision.gpu is not None and DEVICE_ORDER not in environ and VISIBLE_DEVICES in environ:
        current = environ[VISIBLE_DEVICES]
        if current != decision.gpu.uuid and not conflicts:
            conflicts.append(
                f"{VISIBLE_DEVICES}={current!r} is set without {DEVICE_ORDER}=PCI_BUS_ID: "
                "CUDA would number GPUs fastest-first"
            )
    return conflicts


def loaded_cuda_libraries(modules: Mapping[str, Any]) -> list[str]:
    return [name for name in CUDA_LIBRARIES if name in modules]


def apply(decision: GpuDecision, environ: MutableMapping[str, str]) -> None:
    """Write the decision into the environment, for this process and its children."""
    for name, value in decision.environment.items():
        environ[name] = value


def guard(
    policy: GpuSettings,
    *,
    devices: Sequence[GpuDevice] | str | None = "nvml",
    environ: MutableMapping[str, str] | None = None,
    modules: Mapping[str, Any] | None = None,
) -> GpuDecision:
    """Enumerate, decide, check the environment, pin. Call before any CUDA library loads.

    ``devices`` defaults to what NVML reports; tests inject device lists.
    Raises :class:`GpuPolicyError` when the policy fails or the environment contradicts it.
    """
    env = os.environ if environ is None else environ
    found = enumerate_gpus() if isinstance(devices, str) else devices
    decision = choose_gpu(found, policy)
    conflicts = environment_conflicts(decision, env)
    if conflicts:
        raise GpuPolicyError(
            "; ".join(conflicts) + ". Unset them: the GPU guard chooses the GPU (gpu.* settings)."
        )
    early = loaded_cuda_libraries(sys.modules if modules is None else modules)
    if early and decision.on_gpu:
        raise GpuPolicyError(
            f"{', '.join(early)} imported before the GPU guard ran: the GPU cannot be pinned safely"
        )
    apply(decision, env)
    level = logging.INFO if decision.on_gpu or policy.device == "cpu" else logging.WARNING
    _LOGGER.log(level, "GPU guard: %s", decision.reason)
    for gpu, why in decision.rejected:
        _LOGGER.info("GPU guard: passed over %s: %s", gpu, why)
    return decision


def verify_pinned(decision: GpuDecision, torch_module: Any | None = None) -> list[str]:
    """After import: the CUDA runtime must see exactly the pinned GPU. Returns problems found."""
    if not decision.on_gpu or decision.gpu is None:
        return []
    if torch_module is None:
        try:
            import torch
        except ImportError:
            return []
        torch_module = torch
    cuda = torch_module.cuda
    if not cuda.is_available():
        return ["torch sees no CUDA device, though NVML listed the pinned GPU (driver or CUDA build?)"]
    problems = []
    count = cuda.device_count()
    if count != 1:
        problems.append(f"torch sees {count} CUDA devices, expected exactly 1")
    name = cuda.get_device_name(0)
    if name != decision.gpu.name and decision.gpu.name not in name:
        problems.append(f"cuda:0 is {name!r}, expected {decision.gpu.name!r}")
    total = cuda.get_device_properties(0).total_memory
    if abs(total - decision.gpu.total_bytes) > 0.02 * decision.gpu.total_bytes:
        problems.append(f"cuda:0 has {total / GB:.1f} GB, expected {decision.gpu.total_gb:.1f} GB")
    return problems


@dataclass(frozen=True)
class GpuTelemetry:
    used_bytes: int
    total_bytes: int
    utilization_percent: float
    temperature_c: float


def read_telemetry(gpu: GpuDevice) -> GpuTelemetry | None:
    """Memory, utilization and temperature of the pinned GPU from NVML (not torch:
    CTranslate2, llama.cpp and ONNX Runtime allocate outside torch's view)."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:  # NVML gone (driver reload): telemetry is best effort
        return None
    try:
        handle = pynvml.nvmlDeviceGetHandleByUUID(gpu.uuid)
        memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
        rates = pynvml.nvmlDeviceGetUtilizationRates(handle)
        temperature = pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU)
        return GpuTelemetry(int(memory.used), int(memory.total), float(rates.gpu), float(temperature))
    except pynvml.NVMLError as error:
        _LOGGER.debug("NVML telemetry failed: %s", error)
        return None
    finally:
        pynvml.nvmlShutdown()


def resolve_device(requested: str, decision: GpuDecision) -> str | None:
    """A chain level's device ('auto', 'cuda', 'cpu') → 'cuda:0' / 'cpu', or None if unusable."""
    if requested == "cpu":
        return "cpu"
    if requested == "cuda":
        return "cuda:0" if decision.on_gpu else None
    return decision.device


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _normalize_bus_id(bus_id: str) -> tuple[int, ...]:
    """'00000000:01:00.0' → (0, 1, 0, 0); NVML pads the domain to 8 digits, CUDA to 4."""
    parts = bus_id.replace(".", ":").split(":")
    try:
        return tuple(int(part, 16) for part in parts)
    except ValueError:
        return (sys.maxsize,)
