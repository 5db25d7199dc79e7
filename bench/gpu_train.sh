#!/usr/bin/env bash
# GPU check of the training loop (well under 5 minutes): single-GPU samples/s of the pipeline's
# loop (components.training.fit, bf16 autocast) against a hand-written loop with the same model and
# batch; prints the card's name and the ratio (goal: at least 0.97x). bench/gpu_train.py says how.
set -euo pipefail
source "$(dirname "$0")/gpu_env.sh"
PYTHONUNBUFFERED=1 timeout 280 python3 bench/gpu_train.py --out "${OUT:-.}/gpu_train.json"
