"""The default study against a brute-force sweep, on a task the defaults were not tuned on (issue 9).

Task: data=synthetic with 8 classes and 12,000 rows (8,396 to train), the default MLP and SGD,
target val/accuracy 0.75 (the validation plateau is ~0.78 at every batch), budget 30 epochs.
Study: what `python -m pipelines.submit pipeline=study` runs by default, in this process: the
probe, its ladder of batch sizes, one seed per LR tried, the LR searched per batch (x0.5, x1, x2
of the linear rule, extended past an edge up to three times, halved after divergence, one more
seed at the chosen LR), search runs capped at 1.25x the best steps of their batch.
Brute force: every power-of-two batch from 16 to 2048, each with LR x1/16 .. x4 of the linear
rule and 3 seeds, every run to the target or its budget (no cap, no extension, no retry; a grid
LR above one that diverged at the same batch is not run, which only makes the sweep cheaper);
per batch the LR reaching the target in the fewest steps (median over seeds). Both measure steps
to target with the same evaluation cadence.

Goals: the study's B_crit within 1.5x of the sweep's, its S_min within 2x, at no more than a
third of the sweep's compute (samples trained, the probe's included). The default study runs
--studies times (train.seed 100, 200, ..., each with its own probe), so one lucky draw cannot
pass for the rule.

    .venv/bin/python bench/study_vs_sweep.py [--seeds 3] [--studies 3] [--threads 1]
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from machine import describe, finish  # bench/machine.py, beside this file

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("WANDB_MODE", "disabled")
from components import data_prep, probe, storage, study  # noqa: E402
from pipelines.config import compose_config  # noqa: E402

TASK = ["data=synthetic", "data.n_samples=12000", "data.n_classes=8", "eval.target=0.75"]
SWEEP_BATCHES = [16, 32, 64, 128, 256, 512, 1024, 2048]
SWEEP_LR_GRID = [1 / 16, 1 / 8, 1 / 4, 1 / 2, 1, 2, 4]




def run_all(config: dict, dataset: Path, study_dir: Path, manifest: dict, decision=None) -> tuple:
    start = time.perf_counter()
    entries = study.plan(config, manifest["counts"]["train"], decision, manifest)
    rows = [row for entry in entries for row in study.run_batch(entry, str(dataset), str(study_dir))]
    return study.summarize(config, rows, decision), time.perf_counter() - start


def probe_samples(result: dict, config: dict) -> int:
    """Samples the probe trained on: its warm-up, the noise-scale batches (each followed by a
    training step at the small batch) and the throughput ladder."""
    noise, p = result.get("noise_scale") or {}, config["probe"]
    small, n_batches = noise.get("small_batch") or 0, noise.get("n_batches") or 0
    total = (p["warmup_steps"] + n_batches) * small + n_batches * (noise.get("big_batch") or 0)
    for rung in (result.get("throughput") or {}).get("ladder") or []:
        # a rung trains for about its timed seconds (or a fixed step count in older probes), plus a warm-up step
        seconds = rung.get("time_s") or rung.get("seconds")
        steps = rung.get("steps") or (seconds * rung["samples_per_s"] / rung["micro_batch_size"] if seconds
                                      else p.get("throughput_steps", 5))
        total += (steps + 1) * rung["micro_batch_size"]
    return int(total)


def one_study(seed: int, args, work: Path, dataset: Path, manifest: dict) -> dict:
    """The default study (its own probe included) with train.seed = seed."""
    config = compose_config(["pipeline=study", f"run_id=study{seed}", "tracking.mode=disabled", f"output_dir={work}",
                             f"train.cpu_threads={args.threads}", f"train.seed={seed}"] + TASK + args.study)
    start = time.perf_counter()
    result = probe.run(config, str(dataset), str(work / f"probe{seed}.json"), str(work / f"study{seed}"))
    decision = probe.decision(result)
    probe_s = time.perf_counter() - start
    summary, study_s = run_all(config, dataset, work / f"study{seed}", manifest, decision)
    print(f"study (train.seed={seed}): probe {probe_s:.1f} s (B_simple {decision['b_simple']:.0f}, recommends "
          f"{decision['recommendation']['effective_batch_size']}); batches "
          f"{[b['batch_size'] for b in summary['batches']]}; {len(summary['runs'])} runs, {study_s:.1f} s", flush=True)
    return {"seed": seed, "summary": summary, "probe_s": probe_s, "study_s": study_s,
            "probe_samples": probe_samples(result, config)}


def show(fit: dict, key: str) -> str:
    return f"{fit.get(key) or float('nan'):.0f} +- {fit.get(key + '_err') or float('nan'):.0f}"


def per_batch(name: str, summary: dict, reference: dict = None) -> None:
    print(f"\n{name} per batch:")
    ref = {b["batch_size"]: b for b in (reference or {}).get("batches", [])}
    for b in summary["batches"]:
        s, search, other = b["steps_to_target"], b["lr_search"], ref.get(b["batch_size"])
        vs = (f"  vs sweep {s['median'] / other['steps_to_target']['median']:.2f}x"
              if s and other and other["steps_to_target"] else "")
        print(f"  {b['batch_size']:5d}  lr x{b['lr_multiplier'] if b['lr_multiplier'] is not None else '-'}  "
              f"tried {search['tried']}  bracketed {search['bracketed']}  reached {b['reached']}/{b['seeds']}  "
              f"steps {s['median'] if s else '-'}{vs}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=3, help="seeds per (batch, LR) in the sweep")
    parser.add_argument("--studies", type=int, default=3, help="independent default studies (train.seed 100, 200, ...)")
    parser.add_argument("--threads", type=int, default=1, help="train.cpu_threads for every run (both sides)")
    parser.add_argument("--study", action="append", default=[], metavar="KEY=VALUE",
                        help="an override for the studies only (default: none, the study as users get it)")
    parser.add_argument("--out", default=f"bench/results/study_vs_sweep_{time.strftime('%Y-%m-%d')}.json")
    parser.add_argument("--keep", action="store_true", help="keep the runs' directory (printed) instead of deleting it")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="study-bench-"))
    base = compose_config(["pipeline=study", "run_id=bench", "tracking.mode=disabled", f"output_dir={work}"] + TASK)
    dataset = work / "dataset"
    data_prep.run(base, str(dataset))
    manifest = storage.read_json(dataset / "manifest.json")
    machine = describe()
    print(f"{time.strftime('%Y-%m-%d')} {machine}, torch {torch.__version__} on {args.threads} thread(s); "
          f"{manifest['counts']['train']} training examples; target val/accuracy {base['eval']['target']}", flush=True)

    sweep_config = compose_config(["pipeline=study", "run_id=sweep", "tracking.mode=disabled", f"output_dir={work}",
                                   f"train.cpu_threads={args.threads}", "probe.enabled=false", "study.lr_extensions=0",
                                   "study.divergence_retries=0", "study.search_step_cap=null", "study.confirm_seeds=0",
                                   f"study.seeds={args.seeds}", f"study.batch_sizes={SWEEP_BATCHES}",
                                   f"study.lr_grid={SWEEP_LR_GRID}"] + TASK)
    sweep, sweep_s = run_all(sweep_config, dataset, work / "sweep", manifest)
    print(f"sweep: {len(sweep['runs'])} runs ({len(SWEEP_BATCHES)} batches x {len(SWEEP_LR_GRID)} LRs x "
          f"{args.seeds} seeds, fewer where an LR above a diverged one was skipped), {sweep_s:.1f} s; "
          f"B_crit {show(sweep['fit'], 'b_crit')}, S_min {show(sweep['fit'], 's_min')}", flush=True)

    results, lines = [], []
    for k in range(args.studies):
        one = one_study(100 * (k + 1), args, work, dataset, manifest)
        ours, fit_o, fit_s = one["summary"], one["summary"]["fit"], sweep["fit"]

        def ratio(key):
            return fit_o[key] / fit_s[key] if fit_o.get(key) and fit_s.get(key) else None

        spent, reference = ours["compute"]["samples"], sweep["compute"]["samples"]
        one.update(b_crit_ratio=ratio("b_crit"), s_min_ratio=ratio("s_min"),
                   compute={"samples": (spent + one["probe_samples"]) / reference,
                            "samples_without_probe": spent / reference,
                            "wall_time": (one["study_s"] + one["probe_s"]) / sweep_s})
        c = one["compute"]
        lines.append(f"study train.seed={one['seed']}: B_crit {show(fit_o, 'b_crit')} (ratio "
                     f"{one['b_crit_ratio'] or float('nan'):.2f}, goal within 1.5x); S_min {show(fit_o, 's_min')} "
                     f"(ratio {one['s_min_ratio'] or float('nan'):.2f}, goal within 2x); compute {c['samples']:.3f} "
                     f"of the sweep's samples with its probe ({one['probe_samples']:,}), "
                     f"{c['samples_without_probe']:.3f} without, {c['wall_time']:.3f} of its wall time (goal <= 0.333)")
        per_batch(f"study train.seed={one['seed']}", ours, sweep)
        results.append(one)
    per_batch("sweep (best LR)", sweep)
    print("\n" + "\n".join(lines))
    print("\nlast study's answer:\n  " + "\n  ".join(results[-1]["summary"]["answer"]))
    finish(Path(args.out), storage.strict({
        "date": time.strftime("%Y-%m-%d"), "machine": machine, "torch": torch.__version__, "threads": args.threads,
        "task": TASK, "study_overrides": args.study, "sweep_s": sweep_s,
        "sweep": {k: sweep[k] for k in ("batches", "fit", "best", "compute")},
        "studies": [{**{k: v for k, v in r.items() if k != "summary"},
                     "summary": {k: r["summary"][k] for k in ("batches", "fit", "best", "answer", "compute")}}
                    for r in results], "lines": lines}), work, args.keep)


if __name__ == "__main__":
    main()
