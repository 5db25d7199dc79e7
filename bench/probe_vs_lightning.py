"""Memory-fit search (components/memory.py) against Lightning's BatchSizeFinder (binsearch), side by side.

Both searches run against the same SimulatedDevice scenarios as tests/test_memory.py and look
for the same number: the largest micro-batch b <= cap whose simulated peak is within
(1 - margin) x budget (SimulatedDevice.true_max). Ours gets the device's trial as-is (peak bytes,
torch.OutOfMemoryError over the full budget; a peak over the usable budget counts as no fit).
Lightning only sees out-of-memory errors, so its LightningModule raises
RuntimeError("CUDA out of memory. ...") -- what lightning.pytorch.utilities.memory.is_oom_error
matches -- as soon as the simulated peak exceeds the *usable* budget. A trial is one call of the
device model (ours: one `trial(b)`; Lightning: one training step, steps_per_trial=1).
Lightning settings: Tuner.scale_batch_size(mode="binsearch", steps_per_trial=1, max_trials=50,
max_val=cap, margin=0) -- margin=0 because the 10% margin already sits in the OOM threshold
(its default 0.05 would cut its answer by a further 5%); max_val=cap because its default 8192
would cap most scenarios; max_trials=50 because it counts only successful trials, and its
default 25 stops some searches here before they converge. Variants: "shipped" is Lightning as
installed; "fixed" patches one thing: in 2.6.6 the OOM branch of binsearch calls
_adjust_batch_size without max_val, so after an OOM above 8192 the next size is clamped to
8192 (the search restarts from there, and can end on it). init_val: its default 2, and (fixed)
our first probe (8, or first_probe_batch's point on the gradient-floor device).
Wall time: median of repeats in one process. Both sides call gc.collect() (~0.25 s each here,
with torch and lightning imported): ours once after each OOM, Lightning before every trial and
after each OOM; the full collections are counted. Lightning's time also includes its Trainer
machinery (a checkpoint save/restore per search, a fit loop per trial). On a real GPU each
trial's forward/backward adds to both: trials are the number that carries over.

Lightning is not a project dependency. Run from a throwaway venv outside the repo:

    python3.11 -m venv /tmp/lightning-venv
    /tmp/lightning-venv/bin/pip install torch==2.13.0          # the CPU wheel; never unpinned
    echo "torch==2.13.0" > /tmp/lightning-constraints.txt
    /tmp/lightning-venv/bin/pip install -c /tmp/lightning-constraints.txt lightning==2.6.6 numpy
    /tmp/lightning-venv/bin/python bench/probe_vs_lightning.py [--repeats 3] [--out FILE.json]
"""

import argparse
import gc
import json
import logging
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from components.memory import GiB, MiB, SimulatedDevice, find_max_micro_batch  # noqa: E402

try:
    import lightning
    from lightning.pytorch import LightningModule, Trainer
    from lightning.pytorch.tuner import Tuner
    from lightning.pytorch.tuner import batch_size_scaling
except ImportError:
    print("lightning is not importable: create /tmp/lightning-venv as the docstring of this script says")
    sys.exit(2)

KiB = 1 << 10
MARGIN = 0.1


class GradientFloor(SimulatedDevice):
    """As in tests/test_memory.py: the peak is flat (gradient buffers) until activations outgrow them."""

    grads = 1 * GiB

    def peaks(self, b):
        b = b.to(torch.float64)
        return self.fixed_bytes + torch.maximum(self.per_sample_bytes * b, torch.full_like(b, self.grads))


def scenarios():
    """(name, device, cap, our first probe) -- the devices of tests/test_memory.py."""
    linear = [(16 * GiB, int(1.2 * GiB), int(2.3 * MiB), 1 << 16), (80 * GiB, 30 * GiB, 48 * MiB, 1 << 16),
              (1 * GiB, 200 * MiB, 6 * KiB, 1 << 20), (8 * GiB, 6 * GiB, 300 * KiB, 1 << 16),
              (40 * GiB, 2 * GiB, 400 * MiB, 1 << 16), (24 * GiB, 20 * GiB, 20 * KiB, 1 << 20),
              (1 * GiB, 100 * MiB, 4 * KiB, 1797), (80 * GiB, 5 * GiB, 3 * KiB, 60000)]
    for budget, fixed, per_sample, cap in linear:
        name = f"linear {budget // GiB} GiB, {fixed / GiB:.2g} GiB + {per_sample / KiB:.0f} KiB/sample"
        yield name, SimulatedDevice(budget, fixed, per_sample), cap, 8
    yield "cap 6000 just above the limit (16 GiB, 1.2 GiB + 2355 KiB/sample)", \
        SimulatedDevice(16 * GiB, int(1.2 * GiB), int(2.3 * MiB)), 6000, 8  # not in the tests
    yield "quadratic 16 GiB, 2 GiB + 4 MiB/s + 1000 B/s^2", \
        SimulatedDevice(16 * GiB, 2 * GiB, 4 * MiB, 1000), 1 << 16, 8
    yield "noisy +-0.2% 16 GiB, 2 GiB + 1 MiB/sample", SimulatedDevice(16 * GiB, 2 * GiB, MiB, noise=0.002), 1 << 16, 8
    yield "probe 8 too big: 1 GiB, 50 MiB + 150 MiB/sample", SimulatedDevice(1 * GiB, 50 * MiB, 150 * MiB), 1 << 16, 8
    floor = GradientFloor(140 * GiB, 1 * GiB, 532 * KiB)
    yield "gradient floor 140 GiB, 1 GiB + max(532 KiB/s, 1 GiB)", floor, 1 << 21, -(-2 * floor.grads // (532 * KiB))


def fits(device, b) -> bool:
    return float(device.peaks(torch.tensor([b]))[0]) <= (1 - MARGIN) * device.budget_bytes


class Probe(LightningModule):
    """Each training step asks the device model whether its batch fits the usable budget."""

    def __init__(self, device, batch_size, tried):
        super().__init__()
        self.device_model, self.batch_size, self.tried = device, batch_size, tried
        self.w = torch.nn.Parameter(torch.zeros(1))

    def train_dataloader(self):  # a (b, 0) tensor: the batch has b rows and costs nothing to build
        b = self.batch_size

        class Batches(torch.utils.data.IterableDataset):
            def __iter__(self):
                while True:
                    yield torch.empty(b, 0)

        return torch.utils.data.DataLoader(Batches(), batch_size=None)

    def training_step(self, batch, batch_idx):
        b = len(batch)
        self.tried.append(b)
        self.device_model.calls += 1
        if not fits(self.device_model, b):
            raise RuntimeError(f"CUDA out of memory. Tried to allocate (simulated) micro-batch {b}")
        return self.w.sum() * 0

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


SHIPPED_ADJUST = batch_size_scaling._adjust_batch_size
FULL_GCS = []  # one entry per full (generation 2) collection, explicit or automatic
gc.callbacks.append(lambda phase, info: FULL_GCS.append(1) if phase == "start" and info["generation"] == 2 else None)


def timed(search):
    """(search's result, its wall time in ms, the full garbage collections it ran)."""
    FULL_GCS.clear()
    start = time.perf_counter()
    result = search()
    return result, (time.perf_counter() - start) * 1e3, len(FULL_GCS)


def run_ours(device, cap, probe):
    device.calls = 0
    result, ms, gcs = timed(lambda: find_max_micro_batch(device.trial, device.budget_bytes, margin=MARGIN,
                                                         cap=cap, probe=probe))
    assert device.calls == len(result.trials)
    return result.micro_batch, [b for b, _ in result.trials], ms, gcs


def run_lightning(device, cap, init_val, root, fixed):
    def adjust(*args, **kwargs):  # the fix: the OOM branch's call, too, gets max_val=cap
        return SHIPPED_ADJUST(*args, **{**kwargs, "max_val": cap})

    tried = []
    model = Probe(device, init_val, tried)
    trainer = Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=root)
    batch_size_scaling._adjust_batch_size = adjust if fixed else SHIPPED_ADJUST
    try:
        found, ms, gcs = timed(lambda: Tuner(trainer).scale_batch_size(
            model, mode="binsearch", steps_per_trial=1, init_val=init_val, max_trials=50, margin=0.0, max_val=cap))
    finally:
        batch_size_scaling._adjust_batch_size = SHIPPED_ADJUST
    return found, tried, ms, gcs


def summary(device, best, runs):
    found, tried = runs[0][:2]
    assert all(r[:2] == (found, tried) for r in runs), "a search is not deterministic"
    return {"found": found, "trials": len(tried), "tried": tried, "distinct": len(set(tried)),
            "found_was_tried": found in tried, "found_fits": fits(device, found),
            "error_pct": round(100 * (best - found) / best, 2),
            "ms_median": round(statistics.median(r[2] for r in runs), 1), "ms_all": [round(r[2], 1) for r in runs],
            "full_gcs": statistics.median(r[3] for r in runs)}


def cell(s, ms=True):
    flag = "" if s["found_fits"] and s["found_was_tried"] else (" (untried)" if s["found_fits"] else " (OOM!)")
    return f"{s['found']}{flag} / {s['trials']} / {s['error_pct']:.1f}%" + (f" / {s['ms_median']:.{1 if s['ms_median'] < 100 else 0}f}" if ms else "")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "probe_vs_lightning_2026-11-27.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for name, device, cap, probe in scenarios():
            best = device.true_max(cap, margin=MARGIN)
            row = {"scenario": name, "budget_bytes": device.budget_bytes, "cap": cap, "true_max": best,
                   "our_probe": probe,
                   "ours": summary(device, best, [run_ours(device, cap, probe) for _ in range(args.repeats)])}
            for key, init, fixed in (("shipped_init2", 2, False), ("fixed_init2", 2, True),
                                     ("fixed_init_probe", probe, True)):
                runs = [run_lightning(device, cap, init, root, fixed) for _ in range(args.repeats)]
                row[key] = summary(device, best, runs)
            rows.append(row)
            print(f"{name}: true {best} | ours {cell(row['ours'])} ({row['ours']['full_gcs']:g} GC) | "
                  + " | ".join(f"{k} {cell(row[k])} ({row[k]['full_gcs']:g} GC)"
                               for k in ("shipped_init2", "fixed_init2", "fixed_init_probe")), flush=True)
    meta = {"date": "2026-11-27", "lightning_version": lightning.__version__, "torch": torch.__version__,
            "torch_threads": 1, "margin": MARGIN, "repeats": args.repeats,
            "lightning_settings": {"mode": "binsearch", "steps_per_trial": 1, "max_trials": 50, "margin": 0.0,
                                   "max_val": "cap"}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print("\n| scenario | true max | ours: found / trials / error / ms | Lightning binsearch as shipped, init 2: "
          "found / trials / error / ms | same, max_val fixed, init 2 | same, fixed, init = our probe (no ms) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['scenario']} | {r['true_max']} | {cell(r['ours'])} | {cell(r['shipped_init2'])} | "
              f"{cell(r['fixed_init2'])} | {cell(r['fixed_init_probe'], ms=False)} (init {r['our_probe']}) |")
    print(f"\nlightning {lightning.__version__}, torch {torch.__version__}; wrote {args.out}")


if __name__ == "__main__":
    main()
