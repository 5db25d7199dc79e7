"""DDP scaling on CPU: 2 processes (train.nproc=2, torchrun, gloo) against 1, side by side.

The synthetic dataset at a large effective batch (1024 = 256 x accumulation x world size), a
wider MLP, SGD; each run trains `--steps` optimizer steps with `python -m components.train`, as
the pipeline's train step does (each in a process of its own, so none inherits another's thread
pool). Three setups, interleaved so the machine's noise hits all of them:
  1 process with every usable CPU as torch threads (what train.nproc=1 does),
  1 process with 1 thread (the per-rank baseline),
  2 processes with usable CPUs / 2 threads each (what train.nproc=2 does).
samples/s = samples seen / (the trainer's wall time minus its evaluation time): process start,
data loading and torchrun's rendezvous are not counted. The headline is the median over repeats
of the ratio within a repeat (2 processes / 1 process with all CPUs); the per-rank efficiency is
2 processes / (2 x the 1-thread process).

    .venv/bin/python bench/ddp_scaling.py [--steps 40] [--repeats 5] [--out bench/results/ddp_scaling_DATE.json]
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.pop("OMP_NUM_THREADS", None)  # each setup sizes its own threads (components/launch.py)

from machine import describe, finish  # noqa: E402  (bench/machine.py, beside this file)
from components import data_prep, storage  # noqa: E402
from components.config import Config  # noqa: E402
from components.cpu import usable_cpus  # noqa: E402

SETUPS = {"1 process, all CPUs": {"nproc": 1}, "1 process, 1 thread": {"nproc": 1, "cpu_threads": 1},
          "2 processes": {"nproc": 2}}


def base_config(steps: int, out: Path) -> dict:
    raw = Config().to_dict()
    raw["data"].update(name="synthetic", n_samples=24_000, n_features=128, n_classes=10, noise=1.0)
    raw["model"].update(hidden_sizes=[512, 512])
    raw["train"].update(batch_size=1024, micro_batch_size=256, max_steps=steps, max_epochs=1000, lr=0.05,
                        checkpoint_every_s=None)
    raw["eval"].update(every_steps=10 * steps, patience=10_000)  # one evaluation, at the end
    raw["tracking"]["mode"] = "disabled"
    raw["probe"]["enabled"] = False
    raw["output_dir"] = str(out / "runs")
    return raw


def one_run(raw: dict, setup: dict, name: str, dataset: Path, out: Path) -> float:
    """One training as the pipeline's train step runs it, in a fresh `python -m components.train`
    (no setup inherits another's thread pool)."""
    config = {**raw, "run_id": name, "train": {**raw["train"], **setup}}
    storage.write_json(out / f"{name}.json", config)
    run_dir = Path(raw["output_dir"]) / name
    subprocess.run([sys.executable, "-m", "components.train", "--config", str(out / f"{name}.json"), "--dataset",
                    str(dataset), "--model-out", str(out / f"{name}.pt"), "--run-dir", str(run_dir)],
                   cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    outcome = storage.read_json(run_dir / "train_result.json")
    return outcome["samples_seen"] / (outcome["wall_time_s"] - outcome["eval_time_s"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=f"bench/results/ddp_scaling_{time.strftime('%Y-%m-%d')}.json")
    parser.add_argument("--keep", action="store_true", help="keep the runs' directories")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ddp-scaling-"))
    raw = base_config(args.steps, work)
    data_prep.run({**raw, "run_id": "data"}, str(work / "dataset"))
    print(f"machine: {describe()}, {usable_cpus()} usable; {time.strftime('%Y-%m-%d')}; shared and noisy")
    print(f"synthetic {raw['data']['n_samples']} x {raw['data']['n_features']}, MLP {raw['model']['hidden_sizes']}, "
          f"effective batch 1024 = 256 x accumulation x world size, {args.steps} steps per run")
    for name, setup in SETUPS.items():  # caches, torch's thread pool in this process, the first torchrun
        one_run(raw, setup, f"warmup-{len(setup)}-{setup['nproc']}", work / "dataset", work)
    rates = {name: [] for name in SETUPS}
    for r in range(args.repeats):
        order = list(SETUPS) if r % 2 == 0 else list(SETUPS)[::-1]  # no setup always goes first
        for name in order:
            rate = one_run(raw, SETUPS[name], f"r{r}-{name.replace(' ', '-').replace(',', '')}", work / "dataset",
                           work)
            rates[name].append(rate)
            print(f"  repeat {r + 1}: {name}: {rate:,.0f} samples/s", flush=True)
    speedup = [two / one for two, one in zip(rates["2 processes"], rates["1 process, all CPUs"])]
    efficiency = [two / (2 * one) for two, one in zip(rates["2 processes"], rates["1 process, 1 thread"])]
    result = {
        "date": time.strftime("%Y-%m-%d"), "machine": describe(), "usable_cpus": usable_cpus(),
        "steps": args.steps, "repeats": args.repeats, "samples_per_s": rates,
        "ratio_2_processes_vs_1_all_cpus": {"median": statistics.median(speedup), "all": speedup},
        "efficiency_per_rank_vs_1_thread": {"median": statistics.median(efficiency), "all": efficiency},
    }
    print(f"\n2 processes vs 1 process with all CPUs: {result['ratio_2_processes_vs_1_all_cpus']['median']:.2f}x "
          f"(repeats: {', '.join(f'{s:.2f}' for s in speedup)})")
    print(f"per-rank efficiency vs 1 process at 1 thread: {result['efficiency_per_rank_vs_1_thread']['median']:.2f} "
          f"(repeats: {', '.join(f'{e:.2f}' for e in efficiency)})")
    finish(Path(args.out), result, work, args.keep)


if __name__ == "__main__":
    main()
