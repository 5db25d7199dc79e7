"""The machine a benchmark ran on, for BENCHMARKS.md and bench/results/ (these machines are
shared and noisy: every result says where it was measured)."""

import os
import platform
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def describe() -> str:
    return f"{platform.machine()}, {cpu_model()}, {os.cpu_count()} cpus"
