#!/usr/bin/env bash
# GPU check of the training loop (well under 5 minutes): single-GPU samples/s of the pipeline's
# loop (components.training.fit, bf16 autocast) against a hand-written loop with the same model and
# batch; prints the card's name and the ratio (goal: at least 0.97x). bench/gpu_train.py says how.
# The GPU machine's Python has torch; omegaconf comes as wheels in .whl/ (see BENCHMARKS.md).
set -euo pipefail
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
out=${OUT:-.}/gpu_train.json
PYTHONUNBUFFERED=1 timeout 280 python3 bench/gpu_train.py --out "$out"
