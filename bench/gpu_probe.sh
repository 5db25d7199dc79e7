#!/usr/bin/env bash
# GPU check of the probe (well under 5 minutes): memory-fit search vs the true largest
# micro-batch, samples/s, B_simple and an out-of-memory recovered from, on a real CUDA device.
set -euo pipefail
source "$(dirname "$0")/gpu_env.sh"
PYTHONUNBUFFERED=1 python3 bench/gpu_probe.py --out "${OUT:-.}/gpu_probe.json"
