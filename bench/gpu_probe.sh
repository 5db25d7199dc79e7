#!/usr/bin/env bash
# GPU check of the probe (well under 5 minutes): memory-fit search vs the true largest
# micro-batch, samples/s, B_simple and an out-of-memory recovered from, on a real CUDA device.
# The GPU machine's Python has torch; omegaconf comes as wheels in .whl/ (see BENCHMARKS.md).
set -euo pipefail
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
out=${OUT:-.}/gpu_probe.json
PYTHONUNBUFFERED=1 python3 bench/gpu_probe.py --out "$out"
