#!/usr/bin/env bash
# The GPU check of issue 14, one prepared script (<= 6 min on one H100/H200): prefill-only scoring of
# 2,000 prompts (median ~450 tokens) with a random Qwen2.5-0.5B-shape model in bf16, through the
# transformers backend (length-sorted batches), the same batches in arrival order, and vLLM when it is
# installed; prints each path's % of bf16 peak from non-embedding FLOPs and the ratios, same process.
#   bash bench/gpu_llm.sh          # on the GPU machine (torch + CUDA, transformers; no Ray needed)
#   bash bench/gpu_llm.sh --dry    # the same code on a two-layer model on CPU (tests/test_gpu_llm_dry.py)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
if [ "${1:-}" = "--dry" ]; then
  exec timeout 300 "$PY" bench/llm_score.py --dry --arrival
fi
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; print(torch.cuda.get_device_name(0), torch.__version__)"
PEAK=989  # dense bf16 TFLOP/s of H100 SXM and H200 (same tensor cores)
exec timeout 340 "$PY" bench/llm_score.py --device cuda --model-config qwen2.5-0.5b --n 2000 --baseline 0 \
  --arrival --vllm --peak-tflops "$PEAK"
