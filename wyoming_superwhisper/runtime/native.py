"""What native code runs here: the CPU's features, how llama.cpp was built, and a raw smoke per engine.

A native engine that crashes says nothing useful by itself (exit 139). The
doctor and CI name what matters instead: the instruction sets this CPU
reports, the flags llama-cpp-python was compiled with (recorded by
``scripts/build_llama.sh``) and the ones its kernels use.

``python -m wyoming_superwhisper.runtime.native ENGINE`` runs one real engine
(llama, whisper, piper, silero) on the embedded model, raw, in a fresh
process: the CI test runs each one this way, so a build that crashes on the
CI machine's CPU fails with those facts instead of taking the suite down.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
from pathlib import Path
from typing import Any

_LOGGER = logging.getLogger(__name__)

X86_FEATURES = (
    "sse4_2", "avx", "avx2", "fma", "f16c", "bmi2", "avx_vnni", "avx512f", "avx512bw", "avx512vl",
    "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16",
)  # fmt: skip
"""The instruction sets llama.cpp's CPU kernels choose between."""


def cpu_features(cpuinfo: str | None = None) -> tuple[str, ...]:
    """The llama.cpp-relevant features this CPU reports (``/proc/cpuinfo``), in a fixed order."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text("utf-8", "replace")
        except OSError:
            return ()
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
            break
    known = [f for f in X86_FEATURES if f in flags]
    return tuple(known) if known else tuple(sorted(flags))


def llama_build() -> dict[str, str]:
    """What ``scripts/build_llama.sh`` recorded in this environment (empty when pip built it)."""
    marker = Path(sys.prefix) / "llama-cpp-build.txt"
    try:
        text = marker.read_text("utf-8")
    except OSError:
        return {}
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def describe_native() -> str:
    """One line for logs and the doctor: machine, CPU features, llama.cpp build flags."""
    build = llama_build()
    flags = build.get("cmake_args") or "unknown (not built by scripts/build_llama.sh: maybe -march=native)"
    return (
        f"{platform.machine()} CPU with {' '.join(cpu_features()) or 'no known SIMD flags'}; "
        f"llama-cpp-python built with {flags}"
    )


def native_build_hint(engine: str) -> str:
    """What to say next to a crashed engine."""
    if engine.startswith("llama-cpp"):
        return describe_native()
    return f"{platform.machine()} CPU with {' '.join(cpu_features())}"


# --- raw smokes (each in a fresh process) ------------------------------------------


def _model(ref: str) -> Any:
    from ..config import load_settings
    from .registry import ModelRegistry

    return ModelRegistry.from_settings(load_settings()).resolve(ref)


def smoke_llama() -> dict[str, Any]:
    from llama_cpp import Llama, llama_print_system_info

    model = _model("smollm2-135m")
    llm = Llama(model_path=str(model.entry_path), n_ctx=512, verbose=False)
    out = llm.create_chat_completion(
        messages=[{"role": "user", "content": "Dis bonjour en une phrase."}], max_tokens=12, temperature=0.0
    )
    text = out["choices"][0]["message"]["content"] or ""  # type: ignore[index]
    info = llama_print_system_info()
    return {"text": text, "system_info": info.decode() if isinstance(info, bytes) else str(info)}


def smoke_whisper() -> dict[str, Any]:
    import numpy as np
    from faster_whisper import WhisperModel

    model = _model("whisper-base")
    whisper = WhisperModel(str(model.entry_path), device="cpu", compute_type="int8")
    t = np.arange(16000) / 16000
    segments, _ = whisper.transcribe((0.1 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), language="fr")
    return {"segments": len(list(segments))}


def smoke_piper() -> dict[str, Any]:
    from piper import PiperVoice

    model = _model("piper-joe")
    voice = PiperVoice.load(str(model.entry_path))
    pcm = b"".join(chunk.audio_int16_bytes for chunk in voice.synthesize("Hello there."))
    return {"bytes": len(pcm)}


def smoke_silero() -> dict[str, Any]:
    import numpy as np

    from ..asr.vad import SileroSession

    session = SileroSession()
    session.open()
    frames = np.zeros((4, 512), dtype=np.float32)
    probabilities, _, _ = session.run_blocking(
        frames, np.zeros((2, 1, 128), dtype=np.float32), np.zeros(64, dtype=np.float32)
    )
    return {"probabilities": probabilities}


SMOKES = {"llama": smoke_llama, "whisper": smoke_whisper, "piper": smoke_piper, "silero": smoke_silero}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run one native engine raw, on the embedded model.")
    parser.add_argument("engine", choices=sorted(SMOKES))
    args = parser.parse_args(argv)
    result = SMOKES[args.engine]()
    sys.stdout.write(json.dumps({"engine": args.engine, **result, "native": describe_native()}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
