"""Wall time of the default `python -m pipelines.submit`, split into start-up, each pipeline
task (a fresh Python process per task under kfp's local runner) and the training loop itself.

    .venv/bin/python bench/default_run.py [--repeats 2]
"""

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TASK_LINE = re.compile(r"^(\d\d:\d\d:\d\d\.\d+) - INFO - (?:Executing task|Task) .*?'([\w-]+)'.*?(finished|$)")


def task_times(log: Path) -> dict:
    """Seconds per task, from the start/finish lines kfp's local runner writes."""
    started, spans, first = {}, {}, None
    for line in log.read_text().splitlines():
        match = TASK_LINE.match(re.sub(r"\x1b\[\d+m", "", line))
        if not match:
            continue
        stamp = datetime.datetime.strptime(match.group(1), "%H:%M:%S.%f")
        first = first or stamp
        if match.group(3):
            spans[match.group(2)] = (stamp - started[match.group(2)]).total_seconds()
        else:
            started[match.group(2)] = stamp
    return spans


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    rows = []
    for r in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "pipelines.submit", f"output_dir={tmp}", "run_id=bench",
                            "--no-progress"], check=True, capture_output=True, cwd=tmp,
                           env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
            total = time.perf_counter() - start
            run_dir = Path(tmp) / "bench"
            tasks = task_times(run_dir / "pipeline.log")
            loop = json.loads((run_dir / "summary.json").read_text())["wall_time_s"]
            rows.append({"total": total, **tasks, "training loop": loop,
                         "submit start-up + compile + summary": total - sum(tasks.values())})
    print(f"machine: {platform.machine()} {os.cpu_count()} cpus, Python {platform.python_version()}; "
          f"{time.strftime('%Y-%m-%d')}; median of {args.repeats}")
    for key in rows[0]:
        value = statistics.median(row[key] for row in rows)
        print(f"{key:38s} {value:6.2f} s  ({100 * value / statistics.median(r['total'] for r in rows):4.1f}%)")


if __name__ == "__main__":
    main()
