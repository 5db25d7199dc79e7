# Sourced by bench/gpu_*.sh (under their set -euo pipefail): the repository root as the working
# directory, omegaconf's wheels from .whl/ importable (the GPU machine's Python has torch; see
# BENCHMARKS.md), and the card named first in the output.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
