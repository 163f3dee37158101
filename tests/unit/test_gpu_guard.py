"""The GPU guard as a table: injected NVML device lists (no GPU exists here)."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import wyoming_superwhisper
from wyoming_superwhisper.config import GpuSettings
from wyoming_superwhisper.runtime.gpu import (
    DEVICE_ORDER,
    VISIBLE_DEVICES,
    GpuDecision,
    GpuDevice,
    GpuPolicyError,
    choose_gpu,
    devices_in_bus_order,
    guard,
    resolve_device,
    verify_pinned,
)

GIB = 1024**3
# The box this project replaces: the RTX 5060 Ti on PCI bus 0 and the RTX 3090 on bus 1.
DUAL = devices_in_bus_order(
    [
        ("00000000:01:00.0", "NVIDIA GeForce RTX 3090", 24 * GIB, "GPU-3090"),
        ("00000000:00:10.0", "NVIDIA GeForce RTX 5060 Ti", 16 * GIB, "GPU-5060"),
    ]
)
ONLY_5060 = [d for d in DUAL if "5060" in d.name]
POLICY = GpuSettings(require_name="RTX 3090", min_vram_gb=20, forbid_names=("5060",), on_mismatch="fail")


def test_bus_order_puts_the_5060ti_first() -> None:
    assert [d.name for d in DUAL] == ["NVIDIA GeForce RTX 5060 Ti", "NVIDIA GeForce RTX 3090"]
    assert [d.index for d in DUAL] == [0, 1]


def test_dual_gpu_box_pins_the_3090_on_bus_1() -> None:
    decision = choose_gpu(DUAL, POLICY)
    assert decision.device == "cuda:0"
    assert decision.gpu is not None and "3090" in decision.gpu.name
    assert decision.environment == {DEVICE_ORDER: "PCI_BUS_ID", VISIBLE_DEVICES: "1"}
    assert any("5060" in gpu and "forbidden" in why for gpu, why in decision.rejected)


def test_policy_without_names_prefers_most_memory() -> None:
    decision = choose_gpu(DUAL, GpuSettings())
    assert decision.gpu is not None and decision.gpu.index == 1


@pytest.mark.parametrize(
    ("policy", "reason"),
    [
        (POLICY, "forbidden"),
        (GpuSettings(require_name="RTX 3090", on_mismatch="fail"), "lacks required"),
        (GpuSettings(min_vram_gb=20, on_mismatch="fail"), "17.2 GB < required 20 GB"),
    ],
)
def test_only_the_5060ti_fails_when_policy_says_fail(policy: GpuSettings, reason: str) -> None:
    with pytest.raises(GpuPolicyError, match=reason):
        choose_gpu(ONLY_5060, policy)


def test_only_the_5060ti_falls_to_cpu_when_policy_says_cpu() -> None:
    decision = choose_gpu(ONLY_5060, GpuSettings(forbid_names=("5060",), on_mismatch="cpu"))
    assert decision.device == "cpu"
    assert decision.gpu is None
    assert decision.environment == {VISIBLE_DEVICES: ""}  # every GPU hidden from CUDA
    assert "forbidden" in decision.reason


@pytest.mark.parametrize("devices", [None, []])
def test_no_nvml_or_no_gpu(devices: list[GpuDevice] | None) -> None:
    assert choose_gpu(devices, GpuSettings()).device == "cpu"
    with pytest.raises(GpuPolicyError, match="no"):
        choose_gpu(devices, GpuSettings(on_mismatch="fail"))


def test_device_cpu_never_touches_a_gpu() -> None:
    decision = choose_gpu(DUAL, GpuSettings(device="cpu"))
    assert decision.device == "cpu"


def test_guard_pins_the_environment() -> None:
    environ: dict[str, str] = {}
    decision = guard(POLICY, devices=DUAL, environ=environ, modules={})
    assert environ == {DEVICE_ORDER: "PCI_BUS_ID", VISIBLE_DEVICES: "1"}
    assert decision.gpu is not None and decision.gpu.uuid == "GPU-3090"


@pytest.mark.parametrize(
    "preset",
    [
        {VISIBLE_DEVICES: "0"},  # the old scripts pointing at the 5060 Ti
        {VISIBLE_DEVICES: "1"},  # right index but fastest-first order: ambiguous
        {DEVICE_ORDER: "FASTEST_FIRST", VISIBLE_DEVICES: "1"},
    ],
)
def test_guard_detects_conflicting_preset_variables(preset: dict[str, str]) -> None:
    environ = dict(preset)
    with pytest.raises(GpuPolicyError, match=VISIBLE_DEVICES + "|" + DEVICE_ORDER):
        guard(POLICY, devices=DUAL, environ=environ, modules={})
    assert environ == preset  # nothing written on failure


def test_guard_accepts_matching_preset_variables() -> None:
    environ = {DEVICE_ORDER: "PCI_BUS_ID", VISIBLE_DEVICES: "1"}
    assert guard(POLICY, devices=DUAL, environ=environ, modules={}).device == "cuda:0"
    environ = {DEVICE_ORDER: "PCI_BUS_ID", VISIBLE_DEVICES: "GPU-3090"}
    assert guard(POLICY, devices=DUAL, environ=environ, modules={}).device == "cuda:0"


def test_guard_refuses_when_a_cuda_library_was_imported_first() -> None:
    with pytest.raises(GpuPolicyError, match="ctranslate2"):
        guard(POLICY, devices=DUAL, environ={}, modules={"ctranslate2": object()})


def test_resolve_device() -> None:
    on_gpu = choose_gpu(DUAL, POLICY)
    on_cpu = choose_gpu(None, GpuSettings())
    assert resolve_device("cuda", on_gpu) == "cuda:0"
    assert resolve_device("cuda", on_cpu) is None
    assert resolve_device("auto", on_cpu) == "cpu"
    assert resolve_device("cpu", on_gpu) == "cpu"


def fake_torch(count: int, name: str, total: int) -> Any:
    cuda = SimpleNamespace(
        is_available=lambda: count > 0,
        device_count=lambda: count,
        get_device_name=lambda index: name,
        get_device_properties=lambda index: SimpleNamespace(total_memory=total),
    )
    return SimpleNamespace(cuda=cuda)


def test_verify_after_import() -> None:
    decision = choose_gpu(DUAL, POLICY)
    good = fake_torch(1, "NVIDIA GeForce RTX 3090", 24 * GIB)
    assert verify_pinned(decision, good) == []
    wrong = fake_torch(2, "NVIDIA GeForce RTX 5060 Ti", 16 * GIB)
    problems = verify_pinned(decision, wrong)
    assert len(problems) == 3
    assert verify_pinned(GpuDecision("cpu", None, "no gpu"), wrong) == []


PACKAGE = Path(wyoming_superwhisper.__file__).parent
FORBIDDEN = re.compile(
    r"CUDA_VISIBLE_DEVICES|CUDA_DEVICE_ORDER|cuda:[1-9]|\.cuda\.set_device|device_index\s*=\s*[1-9]"
)


def test_no_other_file_chooses_a_gpu() -> None:
    """The audit that found 40 violations, as a test: only runtime/gpu.py may pin a GPU."""
    offenders = []
    roots = [
        PACKAGE,
        PACKAGE.parent / "bench",
        PACKAGE.parent / "scripts",
        PACKAGE.parent / "systemd",
        PACKAGE.parent / "addon",
    ]
    for root in roots:
        if not root.exists():
            continue
        for path in root.rglob("*"):
            if not path.is_file() or path.suffix not in {".py", ".sh", ".service", ".yaml", ".yml", ""}:
                continue
            if any(part.startswith(".") for part in path.relative_to(root).parts):
                continue  # hidden trees (a peer's venv under bench/) are not ours
            if path == PACKAGE / "runtime" / "gpu.py":
                continue
            for number, line in enumerate(path.read_text("utf-8", errors="replace").splitlines(), 1):
                if FORBIDDEN.search(line):
                    offenders.append(f"{path}:{number}: {line.strip()}")
    assert offenders == []
