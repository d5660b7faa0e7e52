#!/usr/bin/env bash
# The GPU path on one GPU in under 10 minutes, with figures: random-weight `gpu`-size model,
# 20 Ray Train steps on 1 GPU worker (FSDP2, nccl, bf16), a subset of `raybench bench fusion`,
# a compiled prefill, and one OpenAI request served by the 3 Serve stages on the GPU.
#   scripts/gpu-check.sh                      # on a machine with one GPU (figures -> gpu-check-out/)
#   scripts/gpu-check.sh --dry-run --out DIR  # the same steps, tiny size, CPU (what the test suite runs)
# Needs raybench installed (README: the GPU machine's install line); nothing is downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [[ " $* " != *" --dry-run "* ]]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
    || { echo "gpu-check: nvidia-smi found no GPU (use --dry-run on a CPU machine)" >&2; exit 2; }
fi
# 600 s: the budget for the whole check; a hang fails it instead of holding the GPU.
exec timeout --signal=INT --kill-after=30 600 python3 -m raybench.gpu_check "$@"
