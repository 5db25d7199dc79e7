"""The convergence study against a brute-force sweep, on digits (issue 4).

Study: what `python -m pipelines.submit pipeline=study` runs with the defaults (the probe, a
ladder of batch sizes around its recommendation, one seed, the LR by the scaling rule), in this
process. Brute force: every power-of-two batch from 8 to 512, each with a log grid of LRs
(x0.25 .. x4 the scaled LR) and 3 seeds; per batch the LR that reaches the target in the fewest
steps. Both go to val/accuracy 0.95 with the same budget. Then, interleaved in this process, the
time to target of the study's fastest batch against the sweep's fastest batch (each with its LR).

Goals: B_crit within a factor of 2 of the sweep's; the study's compute (samples trained, and
wall time) at most a third of the sweep's; its batch's time to target within 1.2x of the best.

    .venv/bin/python bench/study_vs_sweep.py [--seeds 3] [--repeats 15]
"""

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("WANDB_MODE", "disabled")
from components import data_prep, probe, storage, study  # noqa: E402
from pipelines.config import compose_config  # noqa: E402

SWEEP_BATCHES = [8, 16, 32, 64, 128, 256, 512]
SWEEP_LR_GRID = [0.25, 0.5, 1.0, 2.0, 4.0]


def run_all(config: dict, dataset: Path, study_dir: Path, n_train: int, decision=None) -> tuple:
    runs = study.plan(config, n_train, decision)
    start = time.perf_counter()
    rows = [study.run_one(run, str(dataset), str(study_dir)) for run in runs]
    return study.summarize(config, rows, decision), time.perf_counter() - start


def time_to_target(config: dict, dataset: Path, work: Path, batch: int, multiplier: float, seed: int) -> float:
    config = {**config, "study": {**config["study"], "batch_sizes": [batch], "lr_grid": [multiplier]}}
    config["train"] = {**config["train"], "seed": seed}
    run = study.plan(config, storage.read_json(dataset / "manifest.json")["counts"]["train"])[0]
    row = study.run_one(run, str(dataset), str(work / f"t{time.perf_counter_ns()}"))
    return row["time_to_target_s"] if row["reached_target"] else float("inf")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--study-seeds", type=int, default=1, help="study.seeds for the study (default 1)")
    parser.add_argument("--out", default=f"bench/results/study_vs_sweep_{time.strftime('%Y-%m-%d')}.json")
    args = parser.parse_args()
    torch.set_num_threads(1)  # steadier on a shared 2-core machine; both sides alike

    work = Path(tempfile.mkdtemp(prefix="study-bench-"))
    base = compose_config(["pipeline=study", "run_id=bench", "tracking.mode=disabled", f"output_dir={work}"])
    dataset = work / "dataset"
    data_prep.run(base, str(dataset))
    n_train = storage.read_json(dataset / "manifest.json")["counts"]["train"]
    print(f"{time.strftime('%Y-%m-%d')} {platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__} "
          f"on 1 thread; digits, {n_train} training examples; target val/accuracy {base['eval']['target']}")

    # the study, as the pipeline runs it by default
    start = time.perf_counter()
    result = probe.run(base, str(dataset), str(work / "probe-out.json"), str(work / "study"))
    decision = probe.decision(result)
    probe_s = time.perf_counter() - start
    base["study"]["seeds"] = args.study_seeds
    ours, ours_s = run_all(base, dataset, work / "study", n_train, decision)
    ours_s += probe_s
    print(f"study: probe {probe_s:.1f} s (B_simple {decision['b_simple']:.0f}, recommends "
          f"{decision['recommendation']['effective_batch_size']}); batches "
          f"{[b['batch_size'] for b in ours['batches']]}; {len(ours['runs'])} runs, {ours_s:.1f} s in all")

    # the brute-force sweep
    sweep_config = json.loads(json.dumps(base))
    sweep_config["study"].update(batch_sizes=SWEEP_BATCHES, lr_grid=SWEEP_LR_GRID, seeds=args.seeds)
    sweep, sweep_s = run_all(sweep_config, dataset, work / "sweep", n_train)
    print(f"sweep: {len(sweep['runs'])} runs ({len(SWEEP_BATCHES)} batches x {len(SWEEP_LR_GRID)} LRs x "
          f"{args.seeds} seeds), {sweep_s:.1f} s")

    def samples(s):
        return sum(r.get("samples_seen") or 0 for r in s["runs"])

    # the probe trains too: its warm-up steps, the noise-scale batches and the throughput ladder
    noise, p = result["noise_scale"], base["probe"]
    probe_samples = (p["warmup_steps"] * noise["small_batch"] + noise["n_batches"] * noise["big_batch"]
                     + sum((p["throughput_steps"] + 1) * r["micro_batch_size"] for r in result["throughput"]["ladder"]))
    compute = {"samples": (samples(ours) + probe_samples) / samples(sweep), "wall_time": ours_s / sweep_s}

    # Time to target, side by side: the study's fastest batch (its LR by the rule) and every
    # batch of the sweep (its best LR), each run `repeats` times (seeds 0..repeats-1),
    # interleaved. The sweep's best is the fastest median of these: one 0.1 s measurement per
    # run is too noisy here to pick it from the sweep's own runs.
    pick = ours["best"]["time"]["batch_size"]
    multiplier = {b["batch_size"]: b["lr_multiplier"] for b in sweep["batches"] if b["reached"]}
    candidates = [("study", pick, 1.0)] + [(f"sweep {b}", b, m) for b, m in multiplier.items()]
    times = {name: [] for name, _, _ in candidates}
    for r in range(args.repeats):
        for name, batch, m in candidates if r % 2 == 0 else candidates[::-1]:
            times[name].append(time_to_target(base, dataset, work, batch, m, seed=r))
    medians = {name: statistics.median(t) for name, t in times.items()}
    best_name = min((n for n in medians if n != "study"), key=medians.get)
    best = int(best_name.split()[1])
    ratio = medians["study"] / medians[best_name]

    fit_o, fit_s = ours["fit"], sweep["fit"]
    b_ratio = fit_o["b_crit"] / fit_s["b_crit"] if fit_o.get("b_crit") and fit_s.get("b_crit") else None
    lines = [
        f"B_crit: study {fit_o.get('b_crit', float('nan')):.0f} +- {fit_o.get('b_crit_err', float('nan')):.0f}, "
        f"sweep {fit_s.get('b_crit', float('nan')):.0f} +- {fit_s.get('b_crit_err', float('nan')):.0f}: "
        f"ratio {b_ratio if b_ratio else float('nan'):.2f} (goal within 2x)",
        f"compute: study/sweep {compute['samples']:.3f} in samples trained, {compute['wall_time']:.3f} in wall time "
        f"(goal <= 0.333)",
        f"time to target: study's batch {pick} (lr x1) {medians['study']:.3f} s, sweep's best batch "
        f"{best} (lr x{multiplier[best]:g}) {medians[best_name]:.3f} s, medians of {args.repeats}: "
        f"{ratio:.2f}x (goal <= 1.2x); every batch: "
        + ", ".join(f"{n.split()[-1]} {medians[n]:.3f} s" for n in medians if n != "study"),
    ]
    print("\n".join(lines))
    for name, summary in (("study", ours), ("sweep (best LR)", sweep)):
        print(f"\n{name} per batch:")
        for b in summary["batches"]:
            s, t = b["steps_to_target"], b["time_to_target_s"]
            print(f"  {b['batch_size']:4d}  lr x{b['lr_multiplier']:<4g} reached {b['reached']}/{b['seeds']}  "
                  f"steps {s['median'] if s else '-'}  time {t['median'] if t else float('nan'):.3f} s  "
                  f"predicted {b['predicted_time_s'] or float('nan'):.3f} s")
    storage.write_json(Path(args.out), {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "torch": torch.__version__, "study": {k: ours[k] for k in ("batches", "fit", "best", "answer")},
        "sweep": {k: sweep[k] for k in ("batches", "fit", "best")}, "study_s": ours_s, "sweep_s": sweep_s,
        "compute": compute, "b_crit_ratio": b_ratio, "time_to_target": times, "time_ratio": ratio, "lines": lines})
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
