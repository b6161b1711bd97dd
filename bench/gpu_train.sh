#!/usr/bin/env bash
# One prepared GPU training check (issue 13 item 12): the `1b` preset's packed step at 16,384 tokens and
# 48 tiles, varlen + activation checkpointing vs stock transformers packed (SDPA dense mask), in one run;
# prints MFU, tokens/s, peak memory and checks varlen against per-sample attention on the GPU.
# Needs torch (CUDA), transformers, pyarrow, pillow; never Ray. Capped at 8 minutes.
#   bash bench/gpu_train.sh          # on one H100/H200
#   bash bench/gpu_train.sh --dry    # CPU, tiny preset, small shapes (what the tests run)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export TOKENIZERS_PARALLELISM=false
exec timeout 480 "$PY" bench/gpu_train.py "$@"
