"""Probe stability under load: the default probe decides the batch for digits `--runs` times, each in
a fresh process (as the pipeline's probe task runs), while competing processes keep `--busy`
cores busy (started and stopped here). Goal (issue 9): at least 9 of 10 choose the same batch.

    .venv/bin/python bench/probe_stability.py [--runs 10] [--busy 1]
    # side by side with an older probe, runs interleaved (same load for both):
    git archive <commit> | tar -x -C /tmp/before
    .venv/bin/python bench/probe_stability.py --baseline /tmp/before

Prints the choices and a ratio table (per ladder rung: the slowest and fastest median of the runs
against their median, and the rung's own spread), and writes
bench/results/probe_stability_<date>.json.
"""

import argparse
import collections
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_model  # bench/machine.py, beside this file

REPO = Path(__file__).resolve().parent.parent
DATA_PREP = """
import sys
from components import data_prep
from components.config import Config
raw = Config().to_dict()
raw["tracking"]["mode"] = "disabled"
data_prep.run(raw, sys.argv[1])
"""
PROBE = """
import sys
from components import probe
from components.config import Config
raw = Config().to_dict()
raw["tracking"]["mode"] = "disabled"
raw["run_id"] = "bench"
probe.run(raw, sys.argv[1], sys.argv[2], sys.argv[3])
"""




def python(code: str, repo: Path, *args: str, cwd: str) -> float:
    """Runs `code` in a fresh interpreter with `repo` on the path; returns its wall time."""
    env = {**os.environ, "PYTHONPATH": str(repo), "WANDB_MODE": "disabled"}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, *args], env=env, check=True, capture_output=True, cwd=cwd)
    return time.perf_counter() - start


def summarize(runs: list) -> dict:
    choices = collections.Counter(r["effective_batch_size"] for r in runs)
    modal, count = choices.most_common(1)[0]
    table = []
    for b in sorted({r["micro_batch_size"] for run in runs for r in run["ladder"]}):
        rungs = [r for run in runs for r in run["ladder"] if r["micro_batch_size"] == b]
        rates = [r["samples_per_s"] for r in rungs]
        mid = statistics.median(rates)
        spread = [r["spread"] / r["samples_per_s"] for r in rungs if "spread" in r]
        table.append({"micro_batch_size": b, "median_samples_per_s": mid, "slowest_vs_median": min(rates) / mid,
                      "fastest_vs_median": max(rates) / mid,
                      "median_spread_vs_median": statistics.median(spread) if spread else None})
    return {"choices": {str(k): v for k, v in sorted(choices.items())}, "modal_batch": modal, "modal_count": count,
            "goal_met": count >= 0.9 * len(runs),
            "median_probe_wall_time_s": statistics.median(r["probe_wall_time_s"] for r in runs),
            "max_probe_wall_time_s": max(r["probe_wall_time_s"] for r in runs),
            "median_task_wall_time_s": statistics.median(r["task_wall_time_s"] for r in runs),
            "rungs": table, "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--busy", type=int, default=1, help="cores kept busy by competing processes")
    parser.add_argument("--baseline", help="another checkout of this project whose probe runs interleaved with ours")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / f"probe_stability_{time.strftime('%Y-%m-%d')}.json"))
    args = parser.parse_args()
    repos = {"this": REPO, **({"baseline": Path(args.baseline).resolve()} if args.baseline else {})}
    started = time.perf_counter()
    runs = {name: [] for name in repos}
    with tempfile.TemporaryDirectory() as tmp:
        for name, repo in repos.items():  # each probe reads a dataset its own data_prep wrote
            python(DATA_PREP, repo, f"{tmp}/data-{name}", cwd=tmp)
        load_before = os.getloadavg()
        competitors = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
        try:
            time.sleep(0.5)  # let them reach full speed
            for i in range(args.runs):
                for name, repo in repos.items():
                    out = f"{tmp}/probe-{name}-{i}.json"
                    task_s = python(PROBE, repo, f"{tmp}/data-{name}", out, f"{tmp}/run-{name}-{i}", cwd=tmp)
                    result = json.loads(Path(out).read_text())
                    choice = result["recommendation"]
                    runs[name].append({
                        "effective_batch_size": choice["effective_batch_size"],
                        "micro_batch_size": choice["micro_batch_size"],
                        "accumulation_steps": choice["accumulation_steps"], "cpu_threads": result.get("cpu_threads"),
                        "probe_wall_time_s": result["wall_time_s"], "task_wall_time_s": task_s,
                        "ladder": result["throughput"]["ladder"], "remeasured": result["throughput"].get("remeasured"),
                        "settled": result["throughput"].get("settled"),
                        "b_simple": result["noise_scale"]["b_simple"], "reasoning": result["reasoning"]})
                    print(f"run {i + 1} ({name}): batch {choice['effective_batch_size']} = {choice['micro_batch_size']}"
                          f" x {choice['accumulation_steps']}, probe {result['wall_time_s']:.2f} s, "
                          f"{len(result['throughput'].get('remeasured') or [])} re-measure round(s)", flush=True)
        finally:
            for p in competitors:
                p.terminate()
            for p in competitors:
                p.wait()
    report = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
              "cpu_model": cpu_model(), "python": platform.python_version(), "busy_cores": args.busy,
              "load_average_before": load_before, "load_average_after": os.getloadavg(),
              "bench_wall_time_s": time.perf_counter() - started,
              "repos": {name: str(repo) for name, repo in repos.items()},
              **{name: summarize(r) for name, r in runs.items()}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")

    print(f"\n{report['date']}, {report['machine']} ({report['cpu_model']}), {args.busy} core(s) kept busy; "
          f"load average before {load_before[0]:.2f}; bench {report['bench_wall_time_s']:.0f} s")
    for name in repos:
        s = report[name]
        print(f"\n{name} ({repos[name]}): choices {s['choices']} -> {s['modal_count']}/{args.runs} chose "
              f"{s['modal_batch']} (goal: 9/10); probe wall time median {s['median_probe_wall_time_s']:.2f} s, "
              f"max {s['max_probe_wall_time_s']:.2f} s, {s['median_task_wall_time_s']:.1f} s per process")
        print(f"{'micro-batch':>11} {'median samples/s':>17} {'slowest/median':>15} {'fastest/median':>15} "
              f"{'spread/median':>14}")
        for row in s["rungs"]:
            spread = f"{row['median_spread_vs_median']:.3f}" if row["median_spread_vs_median"] is not None else "-"
            print(f"{row['micro_batch_size']:>11} {row['median_samples_per_s']:>17,.0f} "
                  f"{row['slowest_vs_median']:>15.2f} {row['fastest_vs_median']:>15.2f} {spread:>14}")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
