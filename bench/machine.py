"""The machine a benchmark ran on, for BENCHMARKS.md and bench/results/ (these machines are
shared and noisy: every result says where it was measured), and how a benchmark ends: its
result written, its scratch runs kept or removed."""

import json
import os
import platform
import shutil
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


def finish(out: Path, result: dict, work: Path, keep: bool) -> None:
    """Write the result (strict JSON), say where, and remove the scratch runs unless kept."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
    print(f"\nwritten: {out}")
    if keep:
        print(f"runs: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
