#!/usr/bin/env bash
# Home Assistant add-on entry point: options → `superwhisper serve`.
#
# Home Assistant writes the user's options to /data/options.json. The helper
# (options_to_args.py) turns them into command lines, NUL-separated so that no
# value is split or globbed by the shell. Models and caches live under /data,
# which survives add-on updates and is included in backups.
set -euo pipefail

DATA="${SUPERWHISPER_ADDON_DATA:-/data}"
OPTIONS="${DATA}/options.json"
APP="${SUPERWHISPER_ADDON_APP:-/opt/superwhisper}"
PYTHON="${SUPERWHISPER_ADDON_PYTHON:-${APP}/.venv/bin/python}"
HELPER="${APP}/options_to_args.py"

export SUPERWHISPER_MODELS_DIR="${DATA}/models"
export SUPERWHISPER_MODELS__ENVIRONMENT=prod
export XDG_CACHE_HOME="${DATA}/cache"
# Answers said before (a confirmation) are sent at once after a restart too (tts.cache_dir).
export SUPERWHISPER_TTS__CACHE_DIR="${DATA}/tts-segments"
export HF_HOME="${DATA}/cache/huggingface"
export PYTHONUNBUFFERED=1
mkdir -p "${SUPERWHISPER_MODELS_DIR}" "${XDG_CACHE_HOME}"

fetch=()
while IFS= read -r -d '' arg; do fetch+=("$arg"); done < <("${PYTHON}" "${HELPER}" fetch "${OPTIONS}")
serve=()
while IFS= read -r -d '' arg; do serve+=("$arg"); done < <("${PYTHON}" "${HELPER}" serve "${OPTIONS}")
if [ "${#serve[@]}" -eq 0 ]; then
    echo "[superwhisper add-on] invalid options in ${OPTIONS}, see the log above" >&2
    exit 2
fi

if [ "${#fetch[@]}" -gt 0 ]; then
    echo "[superwhisper add-on] fetching the configured models into ${SUPERWHISPER_MODELS_DIR}"
    # A model that cannot be fetched is not fatal: its chain level is skipped
    # and the next one answers (superwhisper doctor explains).
    "${fetch[@]}" || echo "[superwhisper add-on] some models could not be fetched" >&2
fi

# Secrets (the Home Assistant token of option hass_token) by the environment, never on the
# command line, which is logged below.
while IFS= read -r -d '' pair; do export "${pair?}"; done < <("${PYTHON}" "${HELPER}" env "${OPTIONS}")

# Tell Home Assistant where the servers are once they listen (Supervisor discovery).
"${PYTHON}" "${HELPER}" discover "${OPTIONS}" &

echo "[superwhisper add-on] starting: ${serve[*]}"
exec "${serve[@]}"
