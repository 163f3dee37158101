"""One settings tree, three front doors: YAML file, ``SUPERWHISPER_*`` environment, CLI.

The add-on options, systemd ``Environment=`` lines and command-line flags all
fill the same frozen dataclasses, so they cannot drift apart. Every error
names the key and where it came from (file, variable or flag).

Layering, lowest first: the packaged defaults (``config/superwhisper.yaml``),
a user file (``--config``), the environment, the CLI. Environment variables
use ``__`` to step into a section: ``SUPERWHISPER_ASR__LANGUAGE=en``,
``SUPERWHISPER_GPU__FORBID_NAMES='["5060"]'`` (values are parsed as YAML).
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

ENV_PREFIX = "SUPERWHISPER_"


class ConfigError(Exception):
    """A setting is wrong: names the key and the source, and the CLI exits with code 2."""

    def __init__(self, key: str, source: str, message: str) -> None:
        self.key = key
        self.source = source
        self.message = message
        super().__init__(f"{source}: {key}: {message}")


# --- sections -----------------------------------------------------------------


@dataclass(frozen=True)
class EngineLevel:
    """One level of a fallback chain, as configured."""

    model: str = ""
    """Model ref from the registry catalog (``whisper-base``, ``smollm2-135m``...)."""
    device: Literal["auto", "cuda", "cpu"] = "auto"
    """``cuda``: the GPU the guard pinned (skipped on a CPU-only box); ``auto``: GPU if pinned."""
    remote: str = ""
    """Instead of a model: a remote server (``tcp://host:port`` or ``http(s)://…/v1``)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Engine-specific options (compute_type, n_ctx, speaker, api_key...)."""


@dataclass(frozen=True)
class GpuSettings:
    """Which physical GPU this process may use; decided before any CUDA library loads."""

    device: Literal["auto", "cpu"] = "auto"
    """``cpu`` never touches a GPU; ``auto`` pins the one GPU the policy allows."""
    require_name: str = ""
    """Substring the GPU's NVML name must contain, e.g. ``RTX 3090``; empty: any."""
    min_vram_gb: float = 0.0
    """Minimum total memory of the chosen GPU, in GB (10^9 bytes)."""
    forbid_names: tuple[str, ...] = ()
    """Substrings of GPU names that must never be used, e.g. ``["5060"]``."""
    on_mismatch: Literal["fail", "cpu"] = "cpu"
    """No GPU satisfies the policy: ``fail`` refuses to start, ``cpu`` runs on the CPU."""
    vram_high_watermark: float = 0.9
    """Share of GPU memory above which caches are freed and low-priority engines unloaded."""


@dataclass(frozen=True)
class ModelsSettings:
    """Where models are found and stored (the registry's settings)."""

    environment: Literal["dev", "test", "prod"] = "dev"
    """Chooses the default search roots and cache directory."""
    roots: tuple[str, ...] = ()
    """Extra directories searched first for ``<root>/<ref>/``; relative to the config file."""
    cache_dir: str = ""
    """Writable directory for downloads and joined files; empty: per-environment default."""
    catalog: str = ""
    """Path of the model catalog YAML; empty: the packaged ``config/models.yaml``."""
    hub_endpoint: str = ""
    """Hugging Face endpoint or mirror for downloads; empty: the library's default."""


@dataclass(frozen=True)
class ServerSettings:
    """Input limits and socket behaviour shared by every Wyoming server."""

    max_header_bytes: int = 64 * 1024
    """Longest JSON header line accepted, in bytes."""
    max_data_bytes: int = 1024 * 1024
    """Largest ``data_length`` accepted, in bytes."""
    max_payload_bytes: int = 1024 * 1024
    """Largest ``payload_length`` accepted (one audio chunk), in bytes."""
    idle_timeout_s: float = 60.0
    """A connection that sends nothing for this long is closed, in seconds."""
    max_connections: int = 64
    """Connections served at once per server; more are answered ``error`` and closed."""
    max_events_per_second: float = 1000.0
    """Events read per connection per second before reading slows down (TCP backpressure,
    nothing dropped); 0: no limit. Real-time audio is 50-100 events/s."""
    shutdown_timeout_s: float = 10.0
    """On stop, how long running requests may take to finish, in seconds."""
    engine_workers: bool = True
    """Run native engines (llama.cpp, faster-whisper, Piper, Silero) in supervised worker
    processes, so a crash fails one request over to the next level instead of ending the
    server; false: in the server's process (a native crash then ends every service)."""
    worker_cancel_grace_s: float = 30.0
    """After a request to a worker is cancelled (timeout, client gone), how long the engine
    may take to stop before the worker is taken for hung and killed, in seconds. A segment
    being synthesized ends before the voice stops (Kokoro: about 1 s a sentence on 2 CPUs,
    a long run-on sentence several times that): shorter, a slow voice is killed for a hang."""
    worker_restart_backoff_s: float = 1.0
    """Wait before restarting a crashed worker, in seconds; doubles per crash in a row."""
    worker_max_backoff_s: float = 60.0
    """Longest wait between two restarts of a worker that keeps crashing, in seconds."""


@dataclass(frozen=True)
class AsrSettings:
    """Speech-to-text server."""

    uri: str = "tcp://0.0.0.0:10300"
    language: str = "fr"
    """Default language when the client names none."""
    chain: tuple[EngineLevel, ...] = (
        EngineLevel(model="whisper-base", device="cuda"),
        EngineLevel(model="whisper-base", device="cpu"),
    )
    beam_size: int = 5
    max_seconds: float = 30.0
    """Longest utterance accepted, in seconds of audio."""
    endpointing_s: float = 0.0
    """Silence after speech that ends the utterance server-side, in seconds; 0: wait for audio-stop.
    With ``endpointing: semantic`` it is the longest silence waited for an unfinished sentence."""
    endpointing: Literal["fixed", "semantic"] = "semantic"
    """How the server ends an utterance when it endpoints (``endpointing_s > 0``): ``fixed``
    after ``endpointing_s`` of silence; ``semantic``: as soon as a pause of ``turn_pause_s``
    follows a finished sentence (Smart Turn v3.2 + text cues, ``asr/turn.py``), else as fixed."""
    turn_pause_s: float = 0.2
    """Semantic endpointing: the pause after which the sentence is judged, in seconds."""
    turn_decode_pause_s: float = 0.1
    """Semantic endpointing: the pause at which Whisper starts decoding, ahead of the verdict, so
    the transcript is ready when the verdict is due; 0 or ≥ ``turn_pause_s``: at the verdict's pause."""
    turn_threshold: float = 0.5
    """Semantic endpointing: Smart Turn's probability at or above which the turn is over
    (lower, ``asr.turn.COMMAND_THRESHOLD``, for a transcript that is a whole Home Assistant command)."""
    speculative_pause_s: float = 0.3
    """Pause after speech that starts a speculative decode, in seconds; 0: off."""
    vad_threshold: float = 0.5
    """Silero speech probability above which a frame is speech."""
    queue_size: int = 4
    """Transcriptions waiting for the model at most; more get ``error`` (busy)."""
    timeout_s: float = 30.0
    failure_threshold: int = 3
    cooldown_s: float = 30.0
    hass_url: str = ""
    """Home Assistant base URL to fetch entity/area names for recognition hints; empty: off."""
    hass_token: str = ""
    """Long-lived access token for ``hass_url``."""
    hass_refresh_s: float = 300.0
    """How often the Home Assistant names are fetched again, in seconds."""
    min_avg_logprob: float = -2.0
    """Quality gate: a transcript whose average token log-probability is lower is garbage
    and the next chain level redoes it."""
    max_compression_ratio: float = 2.4
    """Quality gate: a transcript more compressible than this is a repetition loop."""
    vad_in_worker: bool = False
    """Run Silero VAD in a supervised worker process too (with ``server.engine_workers``).
    Off by default: every 32 ms frame then pays a round trip to the worker (+0.7 ms a
    frame; +28 ms from audio-stop to transcript when audio comes faster than real time,
    measured), more than the +5 ms the isolation may cost; Silero is the smallest native
    engine and the least likely to crash."""
    numbers: Literal["digits", "words"] = "digits"
    """Spoken numbers in transcripts: ``digits`` ("21 degrés", "50 %", "18 h 30", what
    Home Assistant's intents read) or ``words`` (as Whisper wrote them)."""


@dataclass(frozen=True)
class HandleSettings:
    """LLM "handle" server (and its OpenAI-compatible HTTP API)."""

    uri: str = "tcp://0.0.0.0:10400"
    language: str = "fr"
    chain: tuple[EngineLevel, ...] = (
        EngineLevel(model="nous-hermes-2-mistral-7b-dpo-q4ks", device="cuda"),
        EngineLevel(model="smollm2-135m", device="cpu"),
    )
    assistant_name: str = "Jarvis"
    system_prompt: str = ""
    """Overrides the built-in French voice-assistant prompt; empty: built-in."""
    max_chars: int = 2000
    """Longest transcript accepted, in characters."""
    max_tokens: int = 160
    timeout_s: float = 30.0
    memory_turns: int = 6
    """Exchanges kept per conversation."""
    memory_ttl_s: float = 900.0
    """A conversation idle for this long is forgotten, in seconds."""
    first_token_timeout_s: float = 0.0
    """A level that streams nothing for this long is taken as hung and the next level answers
    with the rest of ``timeout_s``, in seconds; 0 (default): a level may use the whole budget.
    Waiting for a model another request holds counts too, so set it above the longest queue
    wait you expect (``queue_size`` × a typical answer)."""
    route_short_chars: int = 0
    """A request of at most this many characters (and no tools) is tried first on the chain's
    smallest local model (lowest catalog quality below the first level's), then in chain
    order: a quick "allume la cuisine" needs no 13B; 0 (default): always chain order."""
    memory: str = "local"
    """Where conversations live: ``local`` (this process) or a ``redis://`` URL shared by
    replicas (Kubernetes spreads Home Assistant's connections over pods)."""
    implicit_memory_ttl_s: float = 120.0
    """Lifetime of the implicit per-client-host conversation used when the request
    carries no conversation id (Home Assistant 2025.4), in seconds; 0: no memory then."""
    stream_holdback_chars: int = 32
    """Characters of the answer held back while streaming, so the quality gate can reject
    a bad start (and trim a loop) before it is sent; 0: every token goes out at once. The
    last level of the chain has nothing to fall back to: its first word goes out at once,
    the holdback then only trims loops."""
    queue_size: int = 4
    """Requests in flight at most (generating or waiting for a model); more get ``busy``."""
    cpu_nice: int = 10
    """How much lower the local models' CPU priority is than speech's (Unix nice, 0–19). On a
    shared CPU the model goes on writing an answer while the TTS renders its first sentence and
    while the ASR decodes the next request: at the same priority each slows the other by up to
    2× (Kokoro's first sentence 0.90 → 1.86 s beside SmolLM2 on 2 cores, 0.97 s at nice 10).
    Applies to models in worker processes (``server.engine_workers``); 0: the same priority."""
    failure_threshold: int = 3
    cooldown_s: float = 30.0
    api_host: str = "0.0.0.0"
    """Address the ``/v1`` API listens on."""
    api_port: int = 0
    """Port of the OpenAI-compatible ``/v1`` API; 0: off."""
    api_key: str = ""
    """Bearer token required by the ``/v1`` API; empty: no auth."""
    api_max_tokens: int = 1024
    """Largest ``max_tokens`` a ``/v1`` client may ask for (Wyoming requests use ``max_tokens``)."""
    local_intents: bool = True
    """A request with Home Assistant's tools whose last sentence one of Home Assistant's own
    sentence templates matches (``home-assistant-intents``) is answered with that call, and its
    result worded, without a model, as Home Assistant's "prefer handling commands locally";
    false: the model answers everything."""
    hass_url: str = ""
    """Home Assistant base URL (``http://homeassistant.local:8123``): with a token, the Wyoming
    handle acts on the home through Home Assistant's MCP server (its ``mcp_server``
    integration); empty: the Wyoming handle only talks."""
    hass_token: str = ""
    """Long-lived access token for ``hass_url`` (or ``SUPERWHISPER_HANDLE__HASS_TOKEN``)."""
    hass_timeout_s: float = 10.0
    """Longest wait for one exchange with Home Assistant's MCP server (connect, list, call), in s."""
    wyoming_intents: bool = False
    """Without ``hass_url``: a client that speaks Wyoming 1.9+ (its event headers' ``version``;
    Home Assistant 2026.6+) gets a home command Home Assistant's sentence templates recognize as
    ``intents-start``/``intent``/``intents-stop``, which it executes, and ``info`` advertises
    ``supports_home_control``; older clients get text either way. Off by default: the version
    says a client can parse intents, not that it executes them (scripts, satellites)."""


@dataclass(frozen=True)
class TtsSettings:
    """Text-to-speech server."""

    uri: str = "tcp://0.0.0.0:10200"
    language: str = "fr"
    """Language of a request that names none (Home Assistant never sends one)."""
    voices: dict[str, tuple[EngineLevel, ...]] = field(
        default_factory=lambda: {
            "fr": (
                EngineLevel(model="piper-fr_FR-siwis-medium"),
                EngineLevel(model="kokoro-ff_siwis"),
                EngineLevel(model="espeak-fr"),
            ),
            "en": (EngineLevel(model="piper-joe"), EngineLevel(model="espeak-en")),
        }
    )
    """Voice chain per language, best first. A catalog voice serves only the languages its
    entry lists (a French text is never read by an English voice). Levels: ``model: <ref>``
    (Piper options: ``speaker``, ``length_scale``; Kokoro: ``voice``, a packaged voice
    pack, and ``length_scale``; espeak-ng: ``voice``) or ``remote:
    tcp://host:port`` (options: ``voice``, the remote's voice name; ``name``, the name
    in ``describe``)."""
    max_chars: int = 2000
    output_rate: int = 0
    """Resample every answer to this rate in Hz; 0: the first voice's native rate."""
    length_scale: float = 1.0
    """Speaking speed of every voice (>1 slower): Piper's length scale; espeak-ng's words
    per minute (150) are divided by it. A level's ``options.length_scale`` multiplies it."""
    chunked_decode: bool = True
    """Piper voices decode a sentence in chunks and send each as soon as it is ready (first
    audio before the sentence is rendered; a fixed gain per voice instead of a per-sentence
    peak normalization); false: each sentence is synthesized whole."""
    first_segment_chars: int = 40
    """A first sentence longer than this is said in two parts, cut at its first clause
    boundary (a comma, from 16 characters on): a voice that renders a segment whole
    (Kokoro) starts speaking sooner. 0: never cut."""
    cache_mb: float = 32.0
    """Audio of recently said segments kept in memory, by voice, text and speed, in MB (about
    5.5 minutes of 24 kHz audio for 32): a segment said again (a confirmation such as "J'ai
    allumé la lumière du salon.", "C'est fait.") is sent at once instead of after its
    synthesis. Only the chain's first voice's audio is kept, not a fallback's. 0: off."""
    cache_dir: str = ""
    """A directory where the kept segments are also written (WAV files, bounded by
    ``cache_mb`` too), so a restart keeps them; empty: memory only. The add-on keeps them
    in ``/data/tts-segments``, the systemd unit in its cache directory."""
    timeout_s: float = 30.0
    queue_size: int = 8
    """Answers in flight at most, over all connections (speaking or waiting for a voice);
    more get ``busy`` at once instead of hearing their answer seconds late."""
    failure_threshold: int = 3
    cooldown_s: float = 30.0


@dataclass(frozen=True)
class MetricsSettings:
    """The ops HTTP server: /metrics, /healthz, /readyz, /status."""

    enabled: bool = True
    host: str = "0.0.0.0"
    port: int = 9300


@dataclass(frozen=True)
class ZeroconfSettings:
    """Discovery by Home Assistant over mDNS (``_wyoming._tcp.local.``)."""

    enabled: bool = True
    name: str = ""
    """Service name prefix; empty: ``superwhisper-<service>-<hostname>``."""
    addresses: tuple[str, ...] = ()
    """Addresses to advertise; empty: every address of the host's interfaces."""


@dataclass(frozen=True)
class Settings:
    """The whole configuration of one ``superwhisper`` process."""

    gpu: GpuSettings = field(default_factory=GpuSettings)
    models: ModelsSettings = field(default_factory=ModelsSettings)
    server: ServerSettings = field(default_factory=ServerSettings)
    asr: AsrSettings = field(default_factory=AsrSettings)
    handle: HandleSettings = field(default_factory=HandleSettings)
    tts: TtsSettings = field(default_factory=TtsSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    zeroconf: ZeroconfSettings = field(default_factory=ZeroconfSettings)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    config_dir: str = ""
    """Directory of the user's config file (relative paths resolve there); set by the loader."""


# --- loading ------------------------------------------------------------------


def default_config_text() -> str:
    """The packaged ``config/superwhisper.yaml`` (shipped inside the wheel)."""
    return resources.files("wyoming_superwhisper").joinpath("data/superwhisper.yaml").read_text("utf-8")


def load_settings(
    path: str | os.PathLike[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build the settings from defaults, file, environment and CLI overrides (dotted keys)."""
    tree: dict[str, Any] = {}
    _merge(tree, _parse_yaml(default_config_text(), "config/superwhisper.yaml (packaged)"), "")
    config_dir = ""
    if path is not None:
        file_path = Path(path)
        try:
            text = file_path.read_text("utf-8")
        except OSError as error:
            raise ConfigError("--config", str(file_path), f"cannot read: {error.strerror}") from error
        _merge(tree, _parse_yaml(text, str(file_path)), "", str(file_path))
        config_dir = str(file_path.resolve().parent)
    sources: dict[str, str] = {}
    env = os.environ if environ is None else environ
    for name in sorted(env):
        if not name.startswith(ENV_PREFIX):
            continue
        key = name[len(ENV_PREFIX) :].lower().replace("__", ".")
        if "." not in key and key not in _TOP_LEVEL_ENV_KEYS:
            # Not a settings key: SUPERWHISPER_CONFIG, SUPERWHISPER_MODELS_DIR (the registry's),
            # test and benchmark knobs. Settings always name a section, SECTION__KEY.
            continue
        value = _parse_scalar(env[name], name)
        _set_dotted(tree, key, value)
        sources[key] = f"environment {name}"
    for key, value in (overrides or {}).items():
        _set_dotted(tree, key, value)
        sources[key] = f"command line ({key})"
    if config_dir:
        tree["config_dir"] = config_dir
    return _build(Settings, tree, "", _SourceMap(path, sources))


_TOP_LEVEL_ENV_KEYS = {"log_level"}
"""Top-level settings that a single-word variable may set (``SUPERWHISPER_LOG_LEVEL``)."""


class _SourceMap:
    """Tells, for an error, where a key's value came from."""

    def __init__(self, path: str | os.PathLike[str] | None, sources: Mapping[str, str]) -> None:
        self.path = str(path) if path is not None else "config/superwhisper.yaml (packaged)"
        self.sources = sources

    def of(self, key: str) -> str:
        parts = key.split(".")
        for i in range(len(parts), 0, -1):
            found = self.sources.get(".".join(parts[:i]))
            if found:
                return found
        return self.path


def _duplicate_key(node: yaml.Node | None, prefix: str = "") -> tuple[str, int] | None:
    """The first key given twice in one mapping (dotted path, line), found in the composed tree:
    PyYAML keeps the last silently, and the first, maybe the one a user edited, would do nothing."""
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            path = f"{prefix}{key_node.value}"
            if path in seen:
                return path, key_node.start_mark.line + 1
            seen.add(path)
            found = _duplicate_key(value_node, f"{path}.")
            if found:
                return found
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            found = _duplicate_key(item, f"{prefix.rstrip('.')}[{index}].")
            if found:
                return found
    return None


def _parse_yaml(text: str, source: str) -> dict[str, Any]:
    try:
        duplicate = _duplicate_key(yaml.compose(text, Loader=yaml.SafeLoader))
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError("(file)", source, f"not valid YAML: {error}") from error
    if duplicate is not None:
        key, line = duplicate
        raise ConfigError(key, source, f"given twice (again on line {line}): keep one")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("(file)", source, "the top level must be a mapping of sections")
    return data


def _parse_scalar(text: str, source: str) -> Any:
    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as error:
        raise ConfigError(source, "environment", f"not a valid value: {error}") from error


def _merge(into: dict[str, Any], layer: Mapping[str, Any], prefix: str, source: str = "") -> None:
    """Deep-merge mappings; lists and scalars replace. Chains replace whole."""
    for key, value in layer.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _merge(into[key], value, f"{prefix}{key}.", source)
        else:
            into[key] = dict(value) if isinstance(value, Mapping) else value


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


T = typing.TypeVar("T")


def _build(cls: type[T], data: Any, prefix: str, sources: _SourceMap) -> T:
    if not isinstance(data, Mapping):
        raise ConfigError(prefix.rstrip(".") or "(top)", sources.of(prefix.rstrip(".")), "must be a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            full = f"{prefix}{key}"
            known = ", ".join(sorted(fields))
            raise ConfigError(full, sources.of(full), f"unknown key (known here: {known})")
    kwargs = {name: _coerce(hints[name], value, f"{prefix}{name}", sources) for name, value in data.items()}
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, key: str, sources: _SourceMap) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)

    def fail(expected: str) -> ConfigError:
        return ConfigError(key, sources.of(key), f"expected {expected}, got {value!r}")

    if dataclasses.is_dataclass(hint):
        return _build(hint, value, f"{key}.", sources)  # type: ignore[arg-type]
    if origin is Literal:
        if value not in args:
            raise fail("one of " + ", ".join(repr(a) for a in args))
        return value
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key, sources)
            except ConfigError as error:
                errors.append(error)
        raise errors[0] if errors else fail(str(hint))
    if origin is tuple:
        if isinstance(value, str) and args and args[0] is str:
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, list | tuple):
            raise fail("a list")
        item = args[0]
        return tuple(_coerce(item, v, f"{key}[{i}]", sources) for i, v in enumerate(value))
    if origin is dict:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise fail("a mapping")
        key_type, value_type = args
        return {
            _coerce(key_type, k, f"{key}.{k}", sources): _coerce(value_type, v, f"{key}.{k}", sources)
            for k, v in value.items()
        }
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise fail("true or false")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail("a whole number")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise fail("a number")
        return float(value)
    if hint is str:
        if value is None:
            return ""
        if isinstance(value, bool | list | dict):
            raise fail("a string")
        return str(value)
    raise fail(str(hint))  # a type this loader does not know: a bug in the dataclasses


def resolve_path(settings: Settings, value: str) -> Path:
    """A path from the config: ``~`` expanded, relative paths taken from the config file's folder."""
    path = Path(os.path.expanduser(value))
    if not path.is_absolute() and settings.config_dir:
        path = Path(settings.config_dir) / path
    return path


def as_dict(settings: Any) -> dict[str, Any]:
    """Plain data for ``/status``, the doctor and digests."""
    return dataclasses.asdict(settings)
