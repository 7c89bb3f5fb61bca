#!/usr/bin/env bash
# Optional: a separate virtualenv with the LiteLLM proxy, so `python -m bench` can measure it side by
# side with the gateway against the same stub upstream. Idempotent: skipped when its stamp is there.
# The gateway's own venv never imports LiteLLM.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
LITELLM_VENV="${LITELLM_VENV:-$ROOT/.venv-litellm}"
# Tried in order; the first that pip can resolve here is kept.
LITELLM_SPECS=("litellm[proxy]==1.108.*" "litellm[proxy]")

log() { echo "[litellm] $*"; }
STAMP="$LITELLM_VENV/.stamp-litellm"

if [ -f "$STAMP" ] && [ -x "$LITELLM_VENV/bin/litellm" ]; then
  log "already installed: $(cat "$STAMP")"
  exit 0
fi

if [ ! -x "$LITELLM_VENV/bin/python" ]; then
  log "creating $LITELLM_VENV"
  "$PYTHON" -m venv "$LITELLM_VENV"
  "$LITELLM_VENV/bin/pip" install --quiet --upgrade pip
fi

for spec in "${LITELLM_SPECS[@]}"; do
  log "installing $spec"
  if "$LITELLM_VENV/bin/pip" install --quiet "$spec"; then
    version="$("$LITELLM_VENV/bin/python" -c 'from importlib.metadata import version; print(version("litellm"))')"
    echo "litellm[proxy]==$version" >"$STAMP"
    log "ready: $LITELLM_VENV/bin/litellm ($version)"
    exit 0
  fi
  log "$spec did not install"
done
log "no LiteLLM release could be installed"
exit 1
