"""Study timing fidelity (issue 9): does each study run train at the pace the probe measured?

Runs the default study on digits through the real pipeline (`python -m pipelines.submit
pipeline=study`, kfp's local runner, which runs one study_run task at a time), then, for every run
that counts (not superseded) with at least 15 optimizer steps:
- measured: components.study.warm_seconds_per_step over its metrics.jsonl (each step row's wall
  time minus the row before it, the first 5 steps skipped, evaluations left out; the median of
  10-step means, because wall times are written to 0.1 ms);
- predicted: the probe's predicted pace, what the study's own time predictions use
  (components/study_summary.probe_seconds_per_step): batch / the ladder's warmed-up samples/s at
  the run's micro-batch, plus the trainer's own cost per step that the probe measured
  (components/loop_pace.py), plus what the noise-measuring steps cost (a one-micro-batch step
  split into two halves every few steps);
- ladder only: batch / the ladder's samples/s alone, for reference (the bare step).
Goal: median ratio measured / predicted at most 1.3x; the worst run is reported with it. Two
processes that each run torch on every core slow each other's steps by up to 100x here, so a
ratio far above 1 says the runs measured contention, not batch size.

    .venv/bin/python bench/study_timing.py [--repeat 1] [overrides ...]
"""

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import describe, finish  # bench/machine.py, beside this file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from components import storage, study  # noqa: E402
from components.config import load_config_file, parse_config  # noqa: E402
from components.probe import throughput_at  # noqa: E402
from components.study_summary import overhead_of, probe_seconds_per_step  # noqa: E402

MIN_STEPS = study.WARM_STEPS + 10




def ratios(study_dir: Path) -> list:
    probe_json = storage.read_json(study_dir / "probe.json")
    ladder = probe_json["throughput"]["ladder"]
    overhead = overhead_of(probe_json["throughput"])  # the probe's measured loop cost per step
    train = parse_config(load_config_file(str(study_dir / "config.yaml"))).train
    out = []
    for r in storage.read_json(study_dir / "study.json")["runs"]:
        if r.get("superseded") or r.get("status") == "failed" or (r.get("optimizer_steps") or 0) < MIN_STEPS:
            continue
        metrics = storage.read_jsonl(study_dir / r["run_dir"] / "metrics.jsonl")
        measured = study.warm_seconds_per_step(metrics)
        bare = r["batch_size"] / throughput_at(ladder, r["micro_batch_size"])
        predicted = probe_seconds_per_step(ladder, r["batch_size"], r["micro_batch_size"], train, overhead)
        first = next((m["wall_time_s"] for m in metrics if "train/loss" in m), None)
        out.append({"name": r["name"], "batch": r["batch_size"], "micro": r["micro_batch_size"],
                    "steps": r["optimizer_steps"], "measured_s": measured, "predicted_s": predicted,
                    "ratio": measured / predicted, "ladder_only_s": bare, "ladder_only_ratio": measured / bare,
                    "first_step_s": first})
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=1, help="whole studies to run")
    parser.add_argument("--out", default=f"bench/results/study_timing_{time.strftime('%Y-%m-%d')}.json")
    parser.add_argument("overrides", nargs="*", help="config overrides for the study (default: none)")
    parser.add_argument("--keep", action="store_true", help="keep the runs' directory (printed) instead of deleting it")
    args = parser.parse_args()
    machine = describe()
    print(f"{time.strftime('%Y-%m-%d')} {machine}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="study-timing-"))
    studies = []
    for i in range(args.repeat):
        start = time.perf_counter()
        command = [sys.executable, "-m", "pipelines.submit", "pipeline=study", f"output_dir={work}", f"run_id=t{i}",
                   "tracking.mode=disabled", *args.overrides, "--no-progress"]
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"study {i} failed ({done.returncode}): {done.stderr.strip()[-2000:] or done.stdout[-2000:]}")
        rows = ratios(work / f"t{i}")
        wall = time.perf_counter() - start
        median = statistics.median(r["ratio"] for r in rows)
        bare = statistics.median(r["ladder_only_ratio"] for r in rows)
        worst = max(rows, key=lambda r: r["ratio"])
        print(f"\nstudy {i}: {len(rows)} runs timed, {wall:.0f} s in all; median measured/predicted {median:.2f}x "
              f"(goal <= 1.3x), worst {worst['name']} {worst['ratio']:.2f}x; against the ladder only: median "
              f"{bare:.2f}x, worst {max(r['ladder_only_ratio'] for r in rows):.2f}x")
        print("  run                     batch  micro  steps  measured ms/step  predicted  ratio  ladder only  ratio"
              "  first step (s)")
        for r in rows:
            print(f"  {r['name']:23s} {r['batch']:5d} {r['micro']:6d} {r['steps']:6d} {1e3 * r['measured_s']:12.3f}"
                  f" {1e3 * r['predicted_s']:14.3f} {r['ratio']:6.2f} {1e3 * r['ladder_only_s']:12.3f}"
                  f" {r['ladder_only_ratio']:6.2f} {r['first_step_s'] or 0:10.3f}")
        studies.append({"runs": rows, "median_ratio": median, "ladder_only_median_ratio": bare, "worst": worst,
                        "wall_s": wall})
    finish(ROOT / args.out, storage.strict({"date": time.strftime("%Y-%m-%d"), "machine": machine,
                                            "overrides": args.overrides, "studies": studies}), work, args.keep)


if __name__ == "__main__":
    main()
