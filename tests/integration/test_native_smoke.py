"""Each native engine, raw, in a fresh process: a build that crashes on this CPU fails here by name.

``python -m wyoming_superwhisper.runtime.native ENGINE`` runs llama.cpp,
faster-whisper (CTranslate2), Piper and Silero (ONNX Runtime) on the embedded
models. A crash there is a segfault of a child, not of the test run, and the
failure names the CPU's features and llama.cpp's build flags. Then the build
itself: llama-cpp-python must be the portable one that scripts/build_llama.sh
makes (no -march=native, no AVX-512 or AMX kernels), so the CI machine's CPU
cannot hide a build that crashes on the next one.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

from wyoming_superwhisper.runtime.native import describe_native, llama_build
from wyoming_superwhisper.runtime.worker import exit_cause

ENGINES = ("llama", "whisper", "piper", "silero")


def run_native(engine: str) -> dict[str, object]:
    result = subprocess.run(
        [sys.executable, "-m", "wyoming_superwhisper.runtime.native", engine],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if result.returncode != 0:
        how = exit_cause(result.returncode) if result.returncode < 0 else f"exit {result.returncode}"
        pytest.fail(
            f"{engine} failed in a fresh process ({how}) on this machine: {describe_native()}\n"
            f"{result.stderr[-3000:]}"
        )
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("engine", ENGINES)
def test_native_engine_runs_in_a_fresh_process(engine: str) -> None:
    result = run_native(engine)
    assert result["engine"] == engine
    if engine == "llama":
        assert str(result["text"]).strip()
    elif engine == "piper":
        assert int(str(result["bytes"])) > 22050  # more than half a second of 22 kHz audio
    elif engine == "silero":
        probabilities = result["probabilities"]
        assert isinstance(probabilities, list) and all(0.0 <= p < 0.5 for p in probabilities)  # silence


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 flag set")
def test_llama_cpp_is_the_portable_build() -> None:
    build = llama_build()
    assert build, "llama-cpp-python was not installed by scripts/build_llama.sh (pip's -march=native?)"
    flags = build["cmake_args"].split()
    assert "-DGGML_NATIVE=OFF" in flags and "-DGGML_AVX512=OFF" in flags and "-DGGML_AMX_TILE=OFF" in flags
    system_info = str(run_native("llama")["system_info"])
    assert "AVX2 = 1" in system_info  # x86-64-v3 kernels...
    assert "AVX512" not in system_info and "AMX" not in system_info  # ...and nothing above
