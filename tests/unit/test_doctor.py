"""The doctor's verdicts and exit codes (static checks: GPU, config, models).

The functional checks (a real request per service) are in
tests/integration/test_doctor_smoke.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import make_settings
from wyoming_superwhisper.config import GpuSettings
from wyoming_superwhisper.doctor import Report, Status, check_chains, check_gpu, run_doctor
from wyoming_superwhisper.runtime.gpu import choose_gpu, devices_in_bus_order
from wyoming_superwhisper.runtime.registry import ModelRegistry

EMBEDDED_ONLY = {
    "asr.chain": [{"model": "whisper-base", "device": "cpu"}],
    "handle.chain": [{"model": "smollm2-135m", "device": "cpu"}],
    "tts.voices": {"fr": [{"model": "espeak-fr"}], "en": [{"model": "piper-joe"}, {"model": "espeak-en"}]},
}


def doctor(**overrides: object) -> Report:
    import asyncio

    settings = make_settings(**{**EMBEDDED_ONLY, **overrides})
    registry = ModelRegistry.from_settings(settings)
    decision = choose_gpu(None, settings.gpu)
    return asyncio.run(run_doctor(settings, registry, decision, ["asr", "handle", "tts"]))


def test_embedded_models_only_is_all_good() -> None:
    report = doctor()
    assert report.status is Status.OK, report.to_table()
    assert report.gpu["device"] == "cpu"
    found = {c.name for c in report.checks if c.area == "models"}
    assert {"asr.chain[0]", "handle.chain[0]", "tts.voices.fr[0]", "tts.voices.en[0]"} <= found


def test_missing_preferred_model_is_degraded() -> None:
    report = doctor(
        **{
            "asr.chain": [
                {"model": "whisper-large-v3", "device": "cpu"},
                {"model": "whisper-base", "device": "cpu"},
            ]
        }
    )
    assert report.status is Status.DEGRADED
    assert report.exit_code == 1
    line = next(c for c in report.checks if c.name == "asr.chain[0]")
    assert "whisper-large-v3" in line.detail and "fetch" in line.detail


def test_gpu_level_on_cpu_machine_is_not_a_problem() -> None:
    report = doctor(
        **{
            "asr.chain": [
                {"model": "whisper-base", "device": "cuda"},
                {"model": "whisper-base", "device": "cpu"},
            ]
        }
    )
    assert report.status is Status.OK
    assert any("needs a GPU" in c.detail for c in report.checks)


def test_gpu_only_chain_on_cpu_machine_is_broken() -> None:
    report = doctor(**{"handle.chain": [{"model": "smollm2-135m", "device": "cuda"}]})
    assert report.status is Status.BROKEN
    assert any(c.name == "handle.chain" and "no usable level" in c.detail for c in report.checks)


def test_only_missing_models_is_broken() -> None:
    report = doctor(**{"tts.voices": {"fr": [{"model": "piper-fr_FR-upmc-medium"}]}})
    assert report.exit_code == 2


def test_unknown_ref_is_broken_and_names_the_key() -> None:
    report = doctor(**{"asr.chain": [{"model": "whisper-gigantic", "device": "cpu"}]})
    assert report.status is Status.BROKEN
    assert any(c.name == "asr.chain" and "asr.chain[0].model" in c.detail for c in report.checks)


def test_big_model_skipped_on_small_gpu() -> None:
    """VRAM-aware planning: a 16 GB card passes over a model that needs more."""
    settings = make_settings(
        **{
            **EMBEDDED_ONLY,
            "handle.chain": [
                {"model": "nous-hermes-13b", "device": "cuda"},
                {"model": "smollm2-135m", "device": "cpu"},
            ],
        }
    )
    registry = ModelRegistry.from_settings(settings)
    need = registry.spec("nous-hermes-13b").vram_mb
    small = devices_in_bus_order([("0000:01:00.0", "RTX 4060", int((need - 1000) * 1e6), "GPU-a")])
    report = Report()
    check_gpu(report, choose_gpu(small, GpuSettings()), torch_check=False)
    check_chains(report, settings, registry, choose_gpu(small, GpuSettings()), ["handle"])
    skipped = next(c for c in report.checks if c.name == "handle.chain[0]")
    assert "GPU memory" in skipped.detail and skipped.status is Status.OK


def run_cli(*args: str, config: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SUPERWHISPER_", "CUDA_"))}
    env["SUPERWHISPER_MODELS__ENVIRONMENT"] = "test"
    argv = [sys.executable, "-m", "wyoming_superwhisper", *args]
    if config is not None:
        argv += ["--config", str(config)]
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize(
    ("yaml_text", "code"),
    [
        ("asr:\n  chain:\n    - {model: whisper-base, device: cpu}\n", 0),
        (
            "asr:\n  chain:\n    - {model: whisper-large-v3, device: cpu}\n"
            "    - {model: whisper-base, device: cpu}\n",
            1,
        ),
        ("asr:\n  chain:\n    - {model: whisper-large-v3, device: cpu}\n", 2),
        ("gpu:\n  on_mismatch: fail\n  require_name: RTX 3090\n", 2),
    ],
)
def test_cli_doctor_exit_codes(tmp_path: Path, yaml_text: str, code: int) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(yaml_text, encoding="utf-8")
    result = run_cli("doctor", "--no-smoke", "--json", "--only", "asr", config=config)
    assert result.returncode == code, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["exit_code"] == code
    if "gpu" not in yaml_text:
        assert report["gpu"]["device"] == "cpu"
    else:
        assert report["checks"][0]["area"] == "gpu"
        assert "on_mismatch is fail" in report["checks"][0]["detail"]


@pytest.mark.parametrize(
    ("endpointing_s", "endpointing", "line"),
    [(0.8, "semantic", True), (0.8, "fixed", False), (0, "semantic", False)],
)
def test_the_turn_model_is_checked_when_the_asr_ends_turns_semantically(
    endpointing_s: float, endpointing: str, line: bool
) -> None:
    report = doctor(**{"asr.endpointing_s": endpointing_s, "asr.endpointing": endpointing})
    found = [c for c in report.checks if c.name == "asr.endpointing"]
    assert bool(found) is line
    if line:
        assert found[0].status is Status.OK and "smart-turn-v3.2" in found[0].detail
    assert report.status is Status.OK, report.to_table()


def test_a_missing_turn_model_is_degraded_and_says_how_to_fetch(monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine where the pipecat-ai wheel was never installed: the registry finds no file."""
    real_verify = ModelRegistry.verify

    def verify(self: ModelRegistry, ref: str) -> list[str]:
        if ref == "smart-turn-v3.2":
            return ["smart-turn-v3.2-cpu.onnx is missing"]
        return real_verify(self, ref)

    monkeypatch.setattr(ModelRegistry, "verify", verify)
    report = doctor(**{"asr.endpointing_s": 0.8, "asr.endpointing": "semantic"})
    line = next(c for c in report.checks if c.name == "asr.endpointing")
    assert line.status is Status.DEGRADED and report.exit_code == 1
    assert "models fetch smart-turn-v3.2" in line.detail and "(0.8 s) of silence" in line.detail
