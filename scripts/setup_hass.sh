#!/usr/bin/env bash
# Build .venv-hass: a real Home Assistant Core, the client of the end-to-end test
# (tests/e2e/test_home_assistant.py). Safe to run again: it only adds what is missing.
#
#   bash scripts/setup_hass.sh
#
# Why its own venv: Home Assistant's wheels need Python 3.13 (2025.4.4 is the newest
# release that installs on 3.13.0, the interpreter pyenv has on these machines) and pin
# their own libraries (wyoming==1.5.4, aiohttp...), which must not meet the project's.
# Why the component requirements now: Home Assistant installs the requirements of the
# integrations it loads (frontend, backup, recorder, wyoming, assist_pipeline, ...) from
# PyPI at its first start, ~15 s, and a test must not depend on the network; the test
# starts hass with --skip-pip, so whatever is missing here fails loudly there.
#
# Environment: PYTHON_HASS (a Python 3.13 interpreter; default: python3.13 on PATH, then
# pyenv's 3.13.x), HASS_VERSION (default 2025.4.4), HASS_VENV (default .venv-hass).
set -euo pipefail
cd "$(dirname "$0")/.."

hass_version=${HASS_VERSION:-2025.4.4}
venv=${HASS_VENV:-.venv-hass}

log() { printf '\033[1m[setup-hass]\033[0m %s\n' "$*"; }

# --- Debian: ffmpeg converts the TTS answer for the Assist pipeline ------------------
if ! dpkg -s ffmpeg >/dev/null 2>&1; then
  log "installing Debian package ffmpeg (TTS through the Assist pipeline needs it)"
  if [ "$(id -u)" -eq 0 ]; then sudo=""; elif command -v sudo >/dev/null; then sudo="sudo"; else
    echo "setup-hass: need root or sudo to install ffmpeg" >&2; exit 1; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends ffmpeg >/dev/null
fi

# --- Python 3.13 ---------------------------------------------------------------------
is_313() { "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 13))' 2>/dev/null; }
python=${PYTHON_HASS:-}
if [ -z "$python" ]; then
  candidates=(python3.13)
  pyenv_root=${PYENV_ROOT:-$HOME/.pyenv}
  for dir in "$pyenv_root"/versions/3.13*; do
    [ -x "$dir/bin/python" ] && candidates+=("$dir/bin/python")
  done
  for candidate in "${candidates[@]}"; do
    if command -v "$candidate" >/dev/null && is_313 "$candidate"; then python=$candidate; break; fi
  done
fi
if [ -z "$python" ] || ! is_313 "$python"; then
  echo "setup-hass: Home Assistant $hass_version needs Python 3.13 (none found; set PYTHON_HASS=...)" >&2
  exit 1
fi

# --- the venv, uv, Home Assistant ----------------------------------------------------
if [ ! -x "$venv/bin/python" ] || ! is_313 "$venv/bin/python"; then
  log "creating $venv with $python"
  rm -rf "$venv"
  "$python" -m venv "$venv"
fi
if [ ! -x "$venv/bin/uv" ]; then
  log "installing uv into $venv"
  "$venv/bin/python" -m pip --disable-pip-version-check -q install uv
fi
uv_install=("$venv/bin/uv" pip install -q --python "$venv/bin/python")

installed=$("$venv/bin/python" -c 'import homeassistant.const as c; print(c.__version__)' 2>/dev/null || true)
if [ "$installed" != "$hass_version" ]; then
  log "installing homeassistant==$hass_version (~40 s)"
  "${uv_install[@]}" "homeassistant==$hass_version"
fi

# --- the requirements of every integration the test loads ----------------------------
# Asked of Home Assistant itself: the integrations it always sets up, plus those the
# tests add (wyoming; ollama and mcp_server for home control; the entity integrations
# of the test's French home: template, generic_thermostat and their platforms), closed
# over dependencies, after_dependencies and the discovery integrations named in
# manifests, as its requirements check does.
mapfile -t requirements < <("$venv/bin/python" - <<'PY'
import ast
import json
import pathlib
from importlib.util import find_spec

# bootstrap.py is read, not imported: importing it takes ~6 s.
package = pathlib.Path(find_spec("homeassistant").origin).parent
components = package / "components"
constants = {}
for node in ast.parse((package / "bootstrap.py").read_text()).body:
    if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
        name = node.targets[0].id
        if name in ("DEFAULT_INTEGRATIONS", "CORE_INTEGRATIONS"):
            constants[name] = ast.literal_eval(node.value)
discovery = {"bluetooth": "bluetooth", "dhcp": "dhcp", "ssdp": "ssdp", "usb": "usb",
             "zeroconf": "zeroconf", "homekit": "zeroconf"}
tests = {
    "wyoming",
    # home control: Home Assistant's LLM agent talks to our Ollama-compatible API
    "ollama",
    "mcp_server",
    # the French home of tests/e2e/hass.py (write_hass_config's home=True)
    "template",
    "generic_thermostat",
    "input_boolean",
    "input_number",
    "light",
    "switch",
    "climate",
    "fan",
    "cover",
    "sensor",
}
todo = constants["DEFAULT_INTEGRATIONS"] | constants["CORE_INTEGRATIONS"] | tests
seen: set[str] = set()
requirements: set[str] = set()
while todo:
    domain = todo.pop()
    if domain in seen:
        continue
    seen.add(domain)
    manifest_file = components / domain / "manifest.json"
    if not manifest_file.is_file():
        continue
    manifest = json.loads(manifest_file.read_text())
    requirements.update(manifest.get("requirements", []))
    todo |= set(manifest.get("dependencies", [])) | set(manifest.get("after_dependencies", []))
    todo |= {integration for key, integration in discovery.items() if key in manifest}
print("\n".join(sorted(requirements)))
PY
)
# Installed under Home Assistant's own package_constraints.txt, as its requirements
# installer does (pip --constraint): without it, pydantic floats to a release that
# mcp==1.5.0 (mcp_server) cannot import (pydantic 2.10.6 is pinned there).
constraints=$("$venv/bin/python" -c 'import homeassistant, os; print(os.path.join(os.path.dirname(homeassistant.__file__), "package_constraints.txt"))')
stamp="$venv/.superwhisper-requirements"
wanted=$(printf '%s\n' "homeassistant==$hass_version" "${requirements[@]}" "constraints: $(sha256sum "$constraints" | cut -d' ' -f1)")
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$wanted" ]; then
  log "installing ${#requirements[@]} integration requirements: ${requirements[*]}"
  # homeassistant pinned in the same call, so no requirement can move it.
  "${uv_install[@]}" --constraint "$constraints" "homeassistant==$hass_version" "${requirements[@]}"
  printf '%s' "$wanted" >"$stamp"
fi
log "done: $venv/bin/hass (Home Assistant $hass_version)"
