"""The Home Assistant add-on in ``addon/``: manifest conventions and the options → command line path.

No Docker engine runs here, so the image is not built. What can be checked is:
``config.yaml`` follows the add-on conventions and its schema covers exactly
the options the helper reads; the defaults pass the schema; ``run.sh``, run for
real with a fake ``superwhisper`` on ``PATH`` that records its argv and
environment, turns a sample ``options.json`` into the right commands; those
commands parse with the real CLI into the intended settings; and the
Supervisor discovery message is what Home Assistant's wyoming integration reads.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import pytest
import yaml

from tests.conftest import make_settings
from wyoming_superwhisper.cli import _settings_from_args, build_parser, configured_refs
from wyoming_superwhisper.config import EngineLevel, Settings

ROOT = Path(__file__).resolve().parents[2]
ADDON = ROOT / "addon"


def load_helper() -> ModuleType:
    spec = importlib.util.spec_from_file_location("addon_options_to_args", ADDON / "options_to_args.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


helper = load_helper()


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ADDON / "config.yaml").read_text("utf-8"))
    return data


# --- a small validator for Home Assistant's add-on schema language ------------------------------------


def validate(schema: str, value: Any) -> bool:
    """Check one value against a Supervisor schema string (str, int(a,b), list(a|b), match(re)...)."""
    optional = schema.endswith("?")
    kind = schema.rstrip("?")
    if value is None:
        return optional
    if kind in ("str", "password"):
        return isinstance(value, str)
    if kind == "bool":
        return isinstance(value, bool)
    if kind.startswith(("int", "float")):
        number_type: tuple[type, ...] = (int,) if kind.startswith("int") else (int, float)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not isinstance(value, number_type)
        ):
            return False
        bounds = re.fullmatch(r"(?:int|float)(?:\((-?[\d.]*),(-?[\d.]*)\))?", kind)
        assert bounds, kind
        low, high = bounds.group(1), bounds.group(2)
        return (not low or value >= float(low)) and (not high or value <= float(high))
    if kind.startswith("list("):
        return isinstance(value, str) and value in kind[5:-1].split("|")
    if kind.startswith("match("):
        return isinstance(value, str) and re.fullmatch(kind[6:-1], value) is not None
    raise AssertionError(f"schema type {schema!r} not understood")


def validate_options(schema: dict[str, Any], options: dict[str, Any]) -> list[str]:
    problems = []
    for key, value in options.items():
        if key not in schema:
            problems.append(f"{key}: not in schema")
            continue
        rule = schema[key]
        if isinstance(rule, list):
            if not isinstance(value, list) or not all(validate(rule[0], item) for item in value):
                problems.append(f"{key}: {value!r} does not match [{rule[0]}]")
        elif not validate(rule, value):
            problems.append(f"{key}: {value!r} does not match {rule}")
    for key, rule in schema.items():
        if key not in options and not (isinstance(rule, str) and rule.endswith("?")):
            problems.append(f"{key}: required")
    return problems


def test_validator_can_say_no() -> None:
    assert validate("int(1,10)", 5) and not validate("int(1,10)", 11) and not validate("int(1,10)", True)
    assert validate("float(0,)", 2.5) and not validate("float(0,)", -1)
    assert validate("list(fr|en)", "fr") and not validate("list(fr|en)", "de")
    assert not validate("match(^[a-z]+(@(cpu|cuda))?$)", "whisper@gpu")
    assert validate("str?", None) and not validate("str", None)


# --- config.yaml ----------------------------------------------------------------------------------------


def test_manifest_follows_the_add_on_conventions(config: dict[str, Any]) -> None:
    for key in ("name", "version", "slug", "description", "arch", "options", "schema"):
        assert key in config, key
    assert re.fullmatch(r"[a-z0-9_]+", config["slug"])
    assert isinstance(config["version"], str)
    assert sorted(config["arch"]) == ["aarch64", "amd64"]
    assert config["discovery"] == ["wyoming"]
    assert config["ports"] == {
        "10300/tcp": 10300, "10400/tcp": 10400, "10200/tcp": 10200, "9300/tcp": 9300,
        "11434/tcp": None,  # Home Assistant reaches the Ollama API by the add-on's hostname
    }  # fmt: skip
    assert set(config["ports_description"]) == set(config["ports"])
    assert config["init"] is False  # run.sh is PID 1's child via CMD, no s6 services
    assert "[PORT:9300]/readyz" in config["watchdog"]


def test_version_matches_the_package(config: dict[str, Any]) -> None:
    from wyoming_superwhisper import __version__

    assert config["version"] == __version__
    changelog = (ADDON / "CHANGELOG.md").read_text("utf-8")
    assert f"## {config['version']}" in changelog


def test_schema_covers_exactly_the_options_the_helper_reads(config: dict[str, Any]) -> None:
    assert set(config["schema"]) == set(helper.OPTIONS)
    assert set(config["options"]) == set(helper.OPTIONS)


def test_default_options_pass_the_schema(config: dict[str, Any]) -> None:
    assert validate_options(config["schema"], config["options"]) == []


def test_default_options_match_the_packaged_settings(config: dict[str, Any]) -> None:
    """The add-on's defaults say what config/superwhisper.yaml says (no drift between front doors)."""
    settings = settings_for(helper.serve_command(config["options"]))
    packaged = settings_for(["superwhisper", "serve"])
    assert settings.asr.chain == packaged.asr.chain
    assert settings.handle.chain == packaged.handle.chain
    assert settings.tts.voices["fr"] == packaged.tts.voices["fr"]
    assert settings.asr.beam_size == packaged.asr.beam_size
    assert settings.gpu == packaged.gpu
    assert settings.handle.assistant_name == packaged.handle.assistant_name


@pytest.mark.parametrize("name", ["en", "fr"])
def test_translations_name_every_option(config: dict[str, Any], name: str) -> None:
    translation = yaml.safe_load((ADDON / "translations" / f"{name}.yaml").read_text("utf-8"))
    assert set(translation["configuration"]) == set(config["schema"])
    for option, text in translation["configuration"].items():
        assert text.get("name") and text.get("description"), option
    assert set(translation["network"]) == set(config["ports"])


def test_build_uses_home_assistant_debian_bases() -> None:
    build = yaml.safe_load((ADDON / "build.yaml").read_text("utf-8"))
    assert set(build["build_from"]) == {"amd64", "aarch64"}
    for arch, image in build["build_from"].items():
        assert image.startswith(f"ghcr.io/home-assistant/{arch}-base-")
    dockerfile = (ADDON / "Dockerfile").read_text("utf-8")
    assert "ARG BUILD_FROM" in dockerfile and "FROM ${BUILD_FROM}" in dockerfile
    assert "download.pytorch.org/whl/cpu torch==" in dockerfile
    assert 'CMD [ "/run.sh" ]' in dockerfile
    for copied in re.findall(r"^COPY (\S+)", dockerfile, flags=re.M):
        assert copied == "src/" or (ADDON / copied).exists(), copied


# --- options → command line ------------------------------------------------------------------------------

SAMPLE = {
    "services": ["asr", "tts"],
    "language": "fr",
    "asr_models": ["whisper-base@cpu", "whisper-tiny.en"],
    "handle_models": ["smollm2-135m@cpu"],
    "tts_voices": ["espeak-fr"],
    "beam_size": 2,
    "assistant_name": "Léon",
    "gpu_device": "cpu",
    "gpu_require_name": "RTX 3090",
    "gpu_min_vram_gb": 20,
    "gpu_forbid_names": ["5060"],
    "gpu_on_mismatch": "fail",
    "ollama_api": False,
    "hass_token": "",
    "fetch_models": True,
    "log_level": "debug",
}


def settings_for(argv: list[str]) -> Settings:
    """What the real CLI makes of a command line (argv[0] is the program)."""
    args = build_parser().parse_args(argv[1:])
    return _settings_from_args(args)


def test_sample_passes_the_schema(config: dict[str, Any]) -> None:
    assert validate_options(config["schema"], SAMPLE) == []


def test_serve_command_sets_every_option() -> None:
    argv = helper.serve_command(SAMPLE)
    assert argv[:4] == ["superwhisper", "serve", "--only", "asr,tts"]
    assert "--no-zeroconf" in argv  # the Supervisor announces the servers, mDNS cannot leave the container
    args = build_parser().parse_args(argv[1:])
    assert args.metrics_port == 9300 and args.log_level == "DEBUG"
    settings = _settings_from_args(args)
    assert settings.asr.language == settings.handle.language == settings.tts.language == "fr"
    assert settings.asr.chain == (
        EngineLevel(model="whisper-base", device="cpu"),
        EngineLevel(model="whisper-tiny.en", device="auto"),
    )
    assert settings.handle.chain == (EngineLevel(model="smollm2-135m", device="cpu"),)
    assert settings.tts.voices["fr"] == (EngineLevel(model="espeak-fr"),)
    assert settings.tts.voices["en"]  # the other language keeps its voices
    assert settings.asr.beam_size == 2
    assert settings.handle.assistant_name == "Léon"
    assert settings.gpu.device == "cpu"
    assert settings.gpu.require_name == "RTX 3090"
    assert settings.gpu.min_vram_gb == 20.0
    assert settings.gpu.forbid_names == ("5060",)  # a string, not the number 5060
    assert settings.gpu.on_mismatch == "fail"


def test_english_voices_go_to_the_english_chain() -> None:
    settings = settings_for(helper.serve_command({**SAMPLE, "language": "en", "tts_voices": ["piper-joe"]}))
    assert settings.tts.language == "en"
    assert settings.tts.voices["en"] == (EngineLevel(model="piper-joe"),)


def test_fetch_command_uses_the_same_settings() -> None:
    fetch = helper.fetch_command(SAMPLE)
    assert fetch[:4] == ["superwhisper", "models", "fetch", "--configured"]
    args = build_parser().parse_args(fetch[1:])
    assert args.command == "models" and args.models_command == "fetch" and args.configured
    assert _settings_from_args(args).asr.chain == settings_for(helper.serve_command(SAMPLE)).asr.chain
    assert helper.fetch_command({**SAMPLE, "fetch_models": False}) == []


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"asr_models": ["whisper-base@gpu"]}, "asr_models"),
        ({"handle_models": []}, "handle_models"),
        ({"services": []}, "services"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_bad_options_are_refused(change: dict[str, Any], message: str) -> None:
    with pytest.raises(helper.OptionsError, match=message):
        helper.serve_command({**SAMPLE, **change})


# --- run.sh for real ------------------------------------------------------------------------------------

FAKE_SUPERWHISPER = """#!{python}
import json, os, sys
with open(os.environ["FAKE_RECORD"], "a", encoding="utf-8") as out:
    env = {{k: v for k, v in os.environ.items() if k.startswith(("SUPERWHISPER", "XDG_", "HF_HOME"))}}
    out.write(json.dumps({{"argv": sys.argv[1:], "env": env}}) + "\\n")
"""


@pytest.fixture
def addon_root(tmp_path: Path) -> Path:
    """The image's layout in a temp dir: /opt/superwhisper (helper + venv python) and /data."""
    app = tmp_path / "opt" / "superwhisper"
    app.mkdir(parents=True)
    shutil.copy(ADDON / "options_to_args.py", app / "options_to_args.py")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "superwhisper"
    fake.write_text(FAKE_SUPERWHISPER.format(python=sys.executable), "utf-8")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    (tmp_path / "data").mkdir()
    return tmp_path


def run_addon(root: Path, options: dict[str, Any]) -> tuple[subprocess.CompletedProcess[str], list[Any]]:
    (root / "data" / "options.json").write_text(json.dumps(options), "utf-8")
    record = root / "record.jsonl"
    env = {
        "PATH": f"{root / 'bin'}:/usr/bin:/bin",
        "SUPERWHISPER_ADDON_DATA": str(root / "data"),
        "SUPERWHISPER_ADDON_APP": str(root / "opt" / "superwhisper"),
        "SUPERWHISPER_ADDON_PYTHON": sys.executable,
        "FAKE_RECORD": str(record),
    }
    result = subprocess.run(
        ["bash", str(ADDON / "run.sh")], env=env, capture_output=True, text=True, timeout=60
    )
    calls = [json.loads(line) for line in record.read_text("utf-8").splitlines()] if record.exists() else []
    return result, calls


def test_run_script_fetches_then_serves(addon_root: Path) -> None:
    result, calls = run_addon(addon_root, SAMPLE)
    assert result.returncode == 0, result.stderr
    assert [call["argv"][:2] for call in calls] == [["models", "fetch"], ["serve", "--only"]]
    assert calls[1]["argv"] == helper.serve_command(SAMPLE)[1:]
    assert calls[0]["argv"] == helper.fetch_command(SAMPLE)[1:]
    env = calls[1]["env"]
    assert env["SUPERWHISPER_MODELS_DIR"] == str(addon_root / "data" / "models")
    assert env["SUPERWHISPER_MODELS__ENVIRONMENT"] == "prod"
    assert env["XDG_CACHE_HOME"].startswith(str(addon_root / "data"))
    assert env["SUPERWHISPER_TTS__CACHE_DIR"] == str(addon_root / "data" / "tts-segments")
    assert (addon_root / "data" / "models").is_dir()
    assert "no SUPERVISOR_TOKEN" in result.stderr  # discovery skipped outside Home Assistant


def test_run_script_values_are_never_split_by_the_shell(addon_root: Path) -> None:
    tricky = {**SAMPLE, "assistant_name": "Jean  *  $HOME ; echo pwned", "fetch_models": False}
    result, calls = run_addon(addon_root, tricky)
    assert result.returncode == 0, result.stderr
    assert len(calls) == 1
    settings = settings_for(["superwhisper", *calls[0]["argv"]])
    assert settings.handle.assistant_name == "Jean  *  $HOME ; echo pwned"


def test_home_control_options_open_the_ollama_api_and_pass_the_token_by_the_environment(
    addon_root: Path,
) -> None:
    token = "eyJ.secret-token.x"  # a long-lived Home Assistant token
    options = {
        **SAMPLE,
        "services": ["handle"],
        "ollama_api": True,
        "hass_token": token,
        "fetch_models": False,
    }
    result, calls = run_addon(addon_root, options)
    assert result.returncode == 0, result.stderr
    settings = settings_for(["superwhisper", *calls[0]["argv"]])
    assert (settings.handle.api_host, settings.handle.api_port) == ("0.0.0.0", helper.OLLAMA_PORT)
    assert settings.handle.hass_url == helper.CORE_URL
    assert calls[0]["env"]["SUPERWHISPER_HANDLE__HASS_TOKEN"] == token
    assert token not in json.dumps(calls[0]["argv"]) and token not in result.stdout + result.stderr
    quiet = settings_for(helper.serve_command({**options, "ollama_api": False, "hass_token": ""}))
    assert (quiet.handle.api_port, quiet.handle.hass_url) == (0, "")
    assert helper.serve_environment({**options, "hass_token": "  "}) == {}


def test_run_script_refuses_bad_options(addon_root: Path) -> None:
    result, calls = run_addon(addon_root, {**SAMPLE, "asr_models": ["not a ref"]})
    assert result.returncode == 2
    assert calls == []
    assert "asr_models" in result.stderr


# --- Supervisor discovery ----------------------------------------------------------------------------


class _Supervisor(BaseHTTPRequestHandler):
    posts: ClassVar[list[tuple[str, str, Any]]] = []

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        type(self).posts.append(
            (self.path, self.headers.get("Authorization", ""), json.loads(self.rfile.read(length)))
        )
        body = b'{"result": "ok", "data": {"uuid": "x"}}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def supervisor() -> Iterator[ThreadingHTTPServer]:
    _Supervisor.posts = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Supervisor)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_discovery_announces_each_listening_server(
    supervisor: ThreadingHTTPServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    listeners = []
    ports = {}
    for service in ("asr", "tts"):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        listeners.append(sock)
        ports[service] = sock.getsockname()[1]
    monkeypatch.setattr(helper, "PORTS", {**ports, "handle": 1})  # handle is not enabled in SAMPLE
    try:
        announced = helper.discover(
            SAMPLE,
            supervisor=f"http://127.0.0.1:{supervisor.server_address[1]}",
            token="secret-token",
            hostname="abcd1234-superwhisper",
            timeout_s=5,
        )
    finally:
        for sock in listeners:
            sock.close()
    expected = [f"tcp://abcd1234-superwhisper:{ports[s]}" for s in ("asr", "tts")]
    assert announced == expected
    assert [post[0] for post in _Supervisor.posts] == ["/discovery", "/discovery"]
    assert all(post[1] == "Bearer secret-token" for post in _Supervisor.posts)
    # what Home Assistant's wyoming config flow reads: service "wyoming", config["uri"]
    assert [post[2] for post in _Supervisor.posts] == [
        {"service": "wyoming", "config": {"uri": uri}} for uri in expected
    ]


def test_discovery_skips_a_server_that_never_listens(
    supervisor: ThreadingHTTPServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(helper, "PORTS", {"asr": 9, "handle": 9, "tts": 9})
    announced = helper.discover(
        {"services": ["asr"]},
        supervisor=f"http://127.0.0.1:{supervisor.server_address[1]}",
        token="t",
        timeout_s=1,
    )
    assert announced == [] and _Supervisor.posts == []


def test_helper_is_standard_library_only() -> None:
    """It runs before anything else in the container; keep it importable by a bare Python."""
    source = (ADDON / "options_to_args.py").read_text("utf-8")
    imported = set(re.findall(r"^(?:from|import) ([a-z_]+)", source, flags=re.M))
    assert imported <= set(sys.stdlib_module_names) | {"__future__"}, imported
    assert os.access(ADDON / "run.sh", os.X_OK)


@pytest.mark.parametrize(
    ("endpointing_s", "endpointing", "fetched"),
    [(0.8, "semantic", True), (0.8, "fixed", False), (0.0, "semantic", False)],
)
def test_configured_models_include_the_turn_model_when_the_server_ends_turns_semantically(
    endpointing_s: float, endpointing: str, fetched: bool
) -> None:
    """`models fetch --configured` (the add-on's and Kubernetes' first step) gets Smart Turn
    exactly when the ASR will use it; otherwise it would fall back to the fixed endpoint."""
    settings = make_settings(**{"asr.endpointing_s": endpointing_s, "asr.endpointing": endpointing})
    refs = configured_refs(settings)
    assert ("smart-turn-v3.2" in refs) is fetched
    assert "whisper-base" in refs and len(refs) == len(set(refs))
