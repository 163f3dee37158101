"""Turn the add-on's ``/data/options.json`` into ``superwhisper`` command lines; announce the servers.

Home Assistant writes the user's add-on options to ``/data/options.json``;
``run.sh`` asks this helper for the command lines (NUL-separated on stdout, so
no value is ever split or glob-expanded by the shell) and execs them. Every
option becomes a ``--set key=<JSON>`` of the settings tree
(``config/superwhisper.yaml``), so the add-on, systemd's ``Environment=`` and
the CLI fill one and the same settings model.

``discover`` tells the Supervisor where the servers listen (the add-on runs in
a container network, where mDNS does not reach Home Assistant): it waits for
each enabled port to accept connections, then POSTs a ``wyoming`` discovery
message, which Home Assistant turns into a "new device found" notification.

Standard library only: it runs with the venv's Python but needs nothing from it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import sys
import time
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any

_LOGGER = logging.getLogger("superwhisper.addon")

PORTS = {"asr": 10300, "handle": 10400, "tts": 10200}
"""Wyoming ports inside the container (config.yaml maps them on the host)."""
OLLAMA_PORT = 11434
"""The handle's Ollama-compatible API (Ollama's own port, what its integration suggests)."""
CORE_URL = "http://homeassistant:8123"
"""Home Assistant Core as an add-on reaches it on the Supervisor's network. Its MCP server
(``/mcp_server/sse``) is not behind the Supervisor's ``/core/api`` proxy, so the Supervisor
token does not open it: a long-lived access token does (option ``hass_token``)."""
OPS_PORT = 9300

LEVEL_RE = re.compile(r"^(?P<model>[A-Za-z0-9_.:+-]+)(?:@(?P<device>auto|cpu|cuda))?$")
"""A chain level as the add-on spells it: ``<model ref>[@auto|cpu|cuda]``."""

OPTIONS: dict[str, str] = {
    # option name → what it sets (documentation for the test and DOCS.md)
    "services": "--only",
    "language": "asr.language, handle.language, tts.language",
    "asr_models": "asr.chain",
    "handle_models": "handle.chain",
    "tts_voices": "tts.voices.<language>",
    "beam_size": "asr.beam_size",
    "assistant_name": "handle.assistant_name",
    "gpu_device": "gpu.device",
    "gpu_require_name": "gpu.require_name",
    "gpu_min_vram_gb": "gpu.min_vram_gb",
    "gpu_forbid_names": "gpu.forbid_names",
    "gpu_on_mismatch": "gpu.on_mismatch",
    "ollama_api": "handle.api_port 11434 (Home Assistant's Ollama integration acts through it)",
    "hass_token": "handle.hass_url + SUPERWHISPER_HANDLE__HASS_TOKEN (the Wyoming handle acts via MCP)",
    "fetch_models": "run `superwhisper models fetch --configured` first",
    "log_level": "log_level",
}
"""Every option the add-on reads; ``config.yaml``'s schema must list exactly these."""


class OptionsError(ValueError):
    """An option value the schema should have refused (the message names the option)."""


def chain(option: str, values: Any) -> list[dict[str, str]]:
    """``["whisper-base@cuda", "whisper-base@cpu"]`` → chain levels for the settings tree."""
    if not isinstance(values, list) or not values:
        raise OptionsError(f"{option}: a non-empty list of model refs is required")
    levels = []
    for value in values:
        match = LEVEL_RE.match(str(value).strip())
        if match is None:
            raise OptionsError(f"{option}: {value!r} is not '<model ref>[@auto|cpu|cuda]'")
        levels.append({"model": match["model"], "device": match["device"] or "auto"})
    return levels


def _set(key: str, value: Any) -> list[str]:
    # JSON is YAML: the CLI parses the value as YAML, and JSON keeps strings strings ("5060").
    return ["--set", f"{key}={json.dumps(value, ensure_ascii=False)}"]


def serve_command(options: Mapping[str, Any], program: str = "superwhisper") -> list[str]:
    """The ``superwhisper serve`` command line for these options."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise OptionsError(f"unknown option(s): {', '.join(unknown)}")
    services = [s for s in options.get("services", list(PORTS)) if s in PORTS]
    if not services:
        raise OptionsError("services: enable at least one of asr, handle, tts")
    language = str(options.get("language", "fr"))
    argv = [program, "serve", "--only", ",".join(services), "--no-zeroconf", "--metrics-port", str(OPS_PORT)]
    argv += ["--log-level", str(options.get("log_level", "info")).upper()]
    for service in ("asr", "handle", "tts"):
        argv += _set(f"{service}.language", language)
    if "asr_models" in options:
        argv += _set("asr.chain", chain("asr_models", options["asr_models"]))
    if "handle_models" in options:
        argv += _set("handle.chain", chain("handle_models", options["handle_models"]))
    if "tts_voices" in options:
        voices = [{"model": level["model"]} for level in chain("tts_voices", options["tts_voices"])]
        argv += _set(f"tts.voices.{language}", voices)
    if "beam_size" in options:
        argv += _set("asr.beam_size", int(options["beam_size"]))
    if options.get("assistant_name"):
        argv += _set("handle.assistant_name", str(options["assistant_name"]))
    if "gpu_device" in options:
        argv += _set("gpu.device", str(options["gpu_device"]))
    argv += _set("gpu.require_name", str(options.get("gpu_require_name") or ""))
    argv += _set("gpu.min_vram_gb", float(options.get("gpu_min_vram_gb") or 0))
    argv += _set("gpu.forbid_names", [str(name) for name in options.get("gpu_forbid_names") or []])
    if "gpu_on_mismatch" in options:
        argv += _set("gpu.on_mismatch", str(options["gpu_on_mismatch"]))
    if options.get("ollama_api") and "handle" in services:
        argv += _set("handle.api_host", "0.0.0.0") + _set("handle.api_port", OLLAMA_PORT)
    if options.get("hass_token") and "handle" in services:
        # The token itself goes by the environment (serve_environment): command lines are logged.
        argv += _set("handle.hass_url", CORE_URL)
    return argv


def serve_environment(options: Mapping[str, Any]) -> dict[str, str]:
    """Secrets for ``superwhisper serve``, passed in its environment rather than its argv."""
    token = str(options.get("hass_token") or "").strip()
    return {"SUPERWHISPER_HANDLE__HASS_TOKEN": token} if token else {}


def fetch_command(options: Mapping[str, Any], program: str = "superwhisper") -> list[str]:
    """``superwhisper models fetch --configured`` with the same settings, or [] when disabled."""
    if not options.get("fetch_models", True):
        return []
    serve = serve_command(options, program)
    settings = [arg for i, arg in enumerate(serve) if arg == "--set" or serve[i - 1] == "--set"]
    return [program, "models", "fetch", "--configured", *settings]


# --- Supervisor discovery -------------------------------------------------------------------------


def wait_for_port(port: int, timeout_s: float, host: str = "127.0.0.1") -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=2):
                return True
        except OSError:
            time.sleep(1)
    return False


def discover(
    options: Mapping[str, Any],
    *,
    supervisor: str | None = None,
    token: str | None = None,
    hostname: str | None = None,
    timeout_s: float = 1800.0,
) -> list[str]:
    """Announce every enabled server to the Supervisor once it listens; returns the URIs announced."""
    supervisor = supervisor or os.environ.get("SUPERVISOR_URL", "http://supervisor")
    token = token or os.environ.get("SUPERVISOR_TOKEN", "")
    if not token:
        _LOGGER.warning("no SUPERVISOR_TOKEN: not running as an add-on, skipping discovery")
        return []
    hostname = hostname or socket.gethostname()
    announced = []
    for service in [s for s in options.get("services", list(PORTS)) if s in PORTS]:
        port = PORTS[service]
        if not wait_for_port(port, timeout_s):
            _LOGGER.error("%s never listened on port %d: not announced", service, port)
            continue
        uri = f"tcp://{hostname}:{port}"
        body = json.dumps({"service": "wyoming", "config": {"uri": uri}}).encode()
        request = urllib.request.Request(
            f"{supervisor}/discovery",
            data=body,
            method="POST",
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                response.read()
        except OSError as error:
            _LOGGER.error("discovery of %s (%s) failed: %s", service, uri, error)
            continue
        _LOGGER.info("announced %s to Home Assistant as %s", service, uri)
        announced.append(uri)
    return announced


def main(argv: Sequence[str]) -> int:
    """``options_to_args.py serve|fetch|env|discover [options.json]``."""
    logging.basicConfig(level=logging.INFO, format="[superwhisper add-on] %(levelname)s %(message)s")
    if not argv or argv[0] not in ("serve", "fetch", "env", "discover"):
        sys.stderr.write("usage: options_to_args.py serve|fetch|env|discover [/data/options.json]\n")
        return 2
    path = argv[1] if len(argv) > 1 else "/data/options.json"
    try:
        with open(path, encoding="utf-8") as handle:
            options = json.load(handle)
        if argv[0] == "discover":
            discover(options)
            return 0
        if argv[0] == "env":  # NAME=value pairs, NUL-separated, for run.sh to export
            sys.stdout.write("".join(f"{k}={v}\0" for k, v in serve_environment(options).items()))
            return 0
        command = serve_command(options) if argv[0] == "serve" else fetch_command(options)
    except (OSError, ValueError) as error:  # OptionsError and JSONDecodeError are ValueErrors
        _LOGGER.error("%s: %s", path, error)
        return 2
    sys.stdout.write("".join(arg + "\0" for arg in command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
