"""Training-loop overhead counted in CPU instructions: the loops of bench/train_loop_overhead.py
(components.training.fit against a hand-written PyTorch loop doing the same steps) run under
valgrind's callgrind, which counts every instruction the process executes.

Why: on these shared 2-core machines identical timed runs differ by +-15%, so a 5% goal cannot be
shown by timing. Instruction counts do not depend on what else runs on the machine: a repeat
gives the same count to within a few hundred thousandths. They measure work, not time (a cache
miss counts as one instruction), so they complement the timed bench rather than replace it; for a
Python loop driving small tensor ops, time follows instructions closely.

How: the timed bench reads its clock at the start and end of each loop. Here that clock calls
getppid(), and callgrind writes its counters out before every getppid call
(`--dump-before=getppid`), so each loop's instructions land in a file of their own. Not counted:
other processes (a W&B service); so W&B scenarios stay in the timed bench. Under valgrind torch
uses the CPU features valgrind emulates (AVX2, no AVX-512): the same kernels for both loops.

Needs valgrind (apt install valgrind). Takes ~10 minutes (importing torch under valgrind takes ~2):

    .venv/bin/python bench/train_loop_instructions.py [--epochs 10] [--out results.json]
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (scenario, [(loop, hand-written reference or fit, batch, micro, noise scale, reference checkpoints)])
SCENARIOS = [
    ("batch 32, bare reference (no checkpoints)", [("hand-written", "hand", 32, 32, True, False),
                                                   ("fit", "fit", 32, 32, True, None)]),
    ("batch 32, checkpoints in both", [("hand-written", "hand", 32, 32, True, True),
                                       ("fit", "fit", 32, 32, True, None)]),
    ("batch 128 = 32 x 4, checkpoints in both", [("hand-written", "hand", 128, 32, True, True),
                                                 ("fit, noise scale off", "fit", 128, 32, False, None),
                                                 ("fit, noise scale on", "fit", 128, 32, True, None)]),
]


def child(epochs: int, labels_path: Path) -> None:
    """Runs under callgrind: warm every loop up, then run each loop twice. Writes, in order, the
    label of every clock reading that ends a loop, so the parent can name the counter dumps."""
    sys.path.insert(0, str(ROOT / "bench"))
    sys.path.insert(0, str(ROOT))
    import torch

    import train_loop_overhead as timed
    from components import datasets

    torch.set_num_threads(1)
    readings = []  # one entry per clock reading (= per getppid call = per counter dump)

    def clock() -> float:
        os.getppid()
        readings.append(None)
        return 0.0

    timed.CLOCK = clock
    data = datasets.build(timed.bench_config(1).data)
    tmp = Path(tempfile.mkdtemp())
    runs = 0

    def run(kind: str, batch: int, micro: int, noise: bool, checkpoints: bool, epochs: int) -> None:
        nonlocal runs
        runs += 1
        cfg = timed.bench_config(epochs, "disabled", batch, micro, noise)
        run_dir = tmp / f"r{runs}"
        run_dir.mkdir()
        if kind == "hand":
            timed.hand_written(cfg, data, data.manifest["counts"]["train"] // batch, epochs, run_dir, checkpoints)
        else:
            timed.ours(cfg, data, run_dir)

    for _, loops in SCENARIOS:  # every code path once, so lazy imports and first-call set-up are not counted
        for _, kind, batch, micro, noise, checkpoints in loops:
            run(kind, batch, micro, noise, checkpoints, 1)
    for scenario, loops in SCENARIOS:
        for repeat in range(2):
            for label, kind, batch, micro, noise, checkpoints in loops:
                run(kind, batch, micro, noise, checkpoints, epochs)
                readings[-1] = {"scenario": scenario, "loop": label, "repeat": repeat}
    labels_path.write_text(json.dumps(readings))
    shutil.rmtree(tmp)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None, help="also write the counts as JSON here")
    parser.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.epochs, args.child)
    if shutil.which("valgrind") is None:
        sys.exit("valgrind not found: install it (apt install valgrind) to count instructions")

    with tempfile.TemporaryDirectory() as tmp:
        labels = Path(tmp) / "labels.json"
        env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
        started = time.perf_counter()
        subprocess.run(["valgrind", "--tool=callgrind", "--dump-before=getppid", "-q",
                        f"--callgrind-out-file={tmp}/cg.%p", sys.executable, __file__, "--epochs", str(args.epochs),
                        "--child", str(labels)], env=env, check=True)
        readings = json.loads(labels.read_text())
        dumps = sorted(Path(tmp).glob("cg.*.*"), key=lambda p: int(p.suffix[1:]))
        if len(dumps) != len(readings):  # something else called getppid: the dumps cannot be named
            sys.exit(f"{len(dumps)} counter dumps for {len(readings)} clock readings; cannot attribute them")
        counts = []
        for dump, label in zip(dumps, readings):
            if label is not None:
                totals = next(line for line in dump.read_text().splitlines() if line.startswith("totals:"))
                counts.append({**label, "instructions": int(totals.split()[1])})
        minutes = (time.perf_counter() - started) / 60

    import torch

    print(f"{time.strftime('%Y-%m-%d')}, {platform.machine()}, torch {torch.__version__}, valgrind callgrind, "
          f"{args.epochs} epochs per loop, {minutes:.0f} min")
    results = {"date": time.strftime("%Y-%m-%d"), "machine": platform.machine(), "torch": torch.__version__,
               "epochs": args.epochs, "counts": counts, "ratios": {}}
    for scenario, loops in SCENARIOS:
        rows = {label: [c["instructions"] for c in counts if c["scenario"] == scenario and c["loop"] == label]
                for label, *_ in loops}
        reference = rows["hand-written"][0]
        print(f"\n{scenario}")
        for label, (first, second) in rows.items():
            ratio = first / reference
            results["ratios"][f"{scenario}: {label}"] = ratio
            print(f"  {label:22s} {first / 1e6:9.1f} M instructions ({ratio:.4f}x the hand-written loop; "
                  f"the repeat differs by {abs(second - first) / first:.1e})")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
