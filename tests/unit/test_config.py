"""Layered settings: packaged defaults → file → environment → CLI; errors name key and source."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from wyoming_superwhisper.config import ConfigError, EngineLevel, load_settings


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "superwhisper.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_packaged_defaults_are_french_first() -> None:
    settings = load_settings(environ={})
    assert settings.asr.language == "fr"
    assert settings.handle.language == "fr"
    assert settings.tts.language == "fr"
    assert settings.asr.uri.endswith(":10300")
    assert settings.handle.uri.endswith(":10400")
    assert settings.tts.uri.endswith(":10200")
    assert EngineLevel(model="whisper-base", device="cpu") in settings.asr.chain


def test_layers_override_in_order(tmp_path: Path) -> None:
    path = write(tmp_path, "asr:\n  beam_size: 2\n  language: de\ngpu:\n  min_vram_gb: 20\n")
    settings = load_settings(
        path,
        environ={"SUPERWHISPER_ASR__BEAM_SIZE": "3", "SUPERWHISPER_GPU__FORBID_NAMES": '["5060"]'},
        overrides={"asr.beam_size": 4},
    )
    assert settings.asr.beam_size == 4  # CLI beats environment beats file
    assert settings.asr.language == "de"  # file beats packaged default
    assert settings.gpu.min_vram_gb == 20.0
    assert settings.gpu.forbid_names == ("5060",)
    assert settings.tts.language == "fr"  # untouched sections keep defaults
    assert settings.config_dir == str(tmp_path.resolve())


def test_chain_from_yaml_replaces_default(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "asr:\n  chain:\n    - {model: whisper-tiny.en, device: cpu}\n    - {remote: 'tcp://10.0.0.2:10300'}\n",
    )
    settings = load_settings(path, environ={})
    assert settings.asr.chain == (
        EngineLevel(model="whisper-tiny.en", device="cpu"),
        EngineLevel(remote="tcp://10.0.0.2:10300"),
    )


def test_comma_separated_list_from_environment() -> None:
    settings = load_settings(environ={"SUPERWHISPER_GPU__FORBID_NAMES": "5060, 4060"})
    assert settings.gpu.forbid_names == ("5060", "4060")


@pytest.mark.parametrize(
    ("text", "key", "fragment"),
    [
        ("asr:\n  beem_size: 3\n", "asr.beem_size", "unknown key"),
        ("asr:\n  beam_size: three\n", "asr.beam_size", "whole number"),
        ("gpu:\n  on_mismatch: explode\n", "gpu.on_mismatch", "one of"),
        ("asr:\n  chain:\n    - {model: whisper-base, device: tpu}\n", "asr.chain[0].device", "one of"),
        ("metrics:\n  enabled: 'yes please'\n", "metrics.enabled", "true or false"),
        ("tts: [1, 2]\n", "tts", "mapping"),
        ("nonsense: 1\n", "nonsense", "unknown key"),
        ("tts:\n  cache_mb: 8\n  cache_mb: 16\n", "tts.cache_mb", "given twice (again on line 3)"),
        ("tts:\n  voices:\n    fr:\n      - model: a\n        model: b\n", "tts.voices.fr[0].model", "twice"),
        ("asr: {}\nasr: {}\n", "asr", "given twice"),
    ],
)
def test_file_errors_name_key_and_file(tmp_path: Path, text: str, key: str, fragment: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as raised:
        load_settings(path, environ={})
    assert raised.value.key == key
    assert raised.value.source == str(path)
    assert fragment in raised.value.message


def test_environment_error_names_variable() -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings(environ={"SUPERWHISPER_ASR__MAX_SECONDS": "[1, 2]"})
    assert raised.value.key == "asr.max_seconds"
    assert "SUPERWHISPER_ASR__MAX_SECONDS" in raised.value.source


def test_invalid_yaml_is_a_config_error(tmp_path: Path) -> None:
    path = write(tmp_path, "asr: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(path, environ={})


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "nope.yaml", environ={})


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "wyoming_superwhisper", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_cli_exits_2_with_key_and_file_on_config_error(tmp_path: Path) -> None:
    path = write(tmp_path, "handle:\n  max_tokens: many\n")
    result = run_cli("doctor", "--no-smoke", "--config", str(path))
    assert result.returncode == 2
    assert "handle.max_tokens" in result.stderr
    assert str(path) in result.stderr


def test_cli_exits_2_on_unknown_model_ref(tmp_path: Path) -> None:
    path = write(tmp_path, "asr:\n  chain:\n    - {model: whisper-huge-v9, device: cpu}\n")
    result = run_cli("doctor", "--no-smoke", "--only", "asr", "--config", str(path))
    assert result.returncode == 2
    assert "asr.chain[0].model" in result.stdout + result.stderr
    assert "whisper-huge-v9" in result.stdout + result.stderr


def test_cli_set_flag_needs_key_value() -> None:
    result = run_cli("doctor", "--no-smoke", "--set", "asr.beam_size")
    assert result.returncode == 2
    assert "KEY=VALUE" in result.stderr


def test_prefixed_variables_that_are_not_settings_are_left_alone() -> None:
    settings = load_settings(
        environ={
            "SUPERWHISPER_MODELS_DIR": "/srv/models",
            "SUPERWHISPER_CONFIG": "/etc/x.yaml",
            "SUPERWHISPER_LOG_LEVEL": "DEBUG",
        }
    )
    assert settings.log_level == "DEBUG"
