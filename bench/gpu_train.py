"""Single-GPU training throughput: the pipeline's loop (components.training.fit) against a
hand-written PyTorch loop, same model, batch and data, bf16 autocast on in both (run by
bench/gpu_train.sh, well under 5 minutes; the issue's goal: at least 0.97x).

A wide MLP (1024-8192x8-10, ~480M parameters: a few ms a step) on synthetic data already on the device, SGD with momentum, batch 512 (no
accumulation). fit runs as the train step runs it: a metrics.jsonl row per step (one host sync
for the loss), train.precision=bf16; once with its defaults (the noise scale measured on every
16th step, which runs that step's batch as two halves) and once with the noise scale off. The
hand-written loop does the same steps and never syncs. Each is timed over the same window of
steps in steady state (from step WARMUP to the last, synchronized at both ends): start-up, the
evaluations (outside the window) and the final checkpoint are not counted. The loops alternate,
so the card's clocks and the host's noise hit both; the headline is the median over repeats of
the ratio within a repeat.

    python bench/gpu_train.py [--out gpu_train.json]        # on CPU: --dry-run, tiny sizes
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from components import training  # noqa: E402
from components.config import Config, parse_config  # noqa: E402
from components.datasets import Dataset  # noqa: E402
from gpu_probe import wide_mlp  # noqa: E402  (bench/, beside this file)

WARMUP = 20  # steps before the window: cuBLAS heuristics, the allocator's pools, the clocks


def synced(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def hand_written(data: Dataset, sizes: tuple, batch: int, steps: int, device: torch.device) -> float:
    """Samples/s of the reference loop over steps WARMUP..steps."""
    torch.manual_seed(0)
    model = wide_mlp(*sizes).to(device)
    x, y = (torch.as_tensor(a).to(device) for a in data.split("train"))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    per_epoch = len(x) // batch
    start = None
    for step in range(steps):
        if step == WARMUP:
            start = synced(device)
        if step % per_epoch == 0:
            order = torch.randperm(len(x), generator=torch.Generator().manual_seed(step)).to(device)
        idx = order[(step % per_epoch) * batch:(step % per_epoch + 1) * batch]
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (steps - WARMUP) * batch / (synced(device) - start)


def ours(data: Dataset, sizes: tuple, batch: int, steps: int, device: torch.device, noise: bool) -> float:
    """Samples/s of fit over the same window of steps, measured from its on_step callback."""
    raw = Config().to_dict()
    raw["train"].update(batch_size=batch, micro_batch_size=batch, max_steps=steps, device=device.type, lr=0.01,
                        lr_scaling="none", precision="bf16", track_noise_scale=noise, checkpoint_every_s=None)
    raw["eval"].update(every_steps=steps, patience=10_000)  # one evaluation, after the window
    raw["tracking"].update(mode="disabled")
    torch.manual_seed(0)
    model = wide_mlp(*sizes)
    marks = {}

    def on_step(step: int) -> None:  # after step `step`: WARMUP steps done, then the last
        if step in (WARMUP, steps):
            marks[step] = synced(device)

    with tempfile.TemporaryDirectory() as run_dir:  # metrics.jsonl rows, as in the pipeline
        training.fit(model, data, parse_config(raw), Path(run_dir), progress=False, on_step=on_step)
    return (steps - WARMUP) * batch / (marks[steps] - marks[WARMUP])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="gpu_train.json")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU, to check the script")
    args = parser.parse_args()
    dry = args.dry_run
    device = torch.device("cpu" if dry else "cuda")
    (features, width, depth), batch, n = ((32, 64, 2), 64, 2048) if dry else ((1024, 8192, 8), 512, 65536)
    steps = min(args.steps, 60) if dry else args.steps
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, features), dtype=np.float32)
    y = (x @ rng.standard_normal((features, 10), dtype=np.float32)).argmax(1)  # learnable labels
    arrays = {"x_train": x, "y_train": y, "x_val": x[:1024], "y_val": y[:1024], "x_test": x[:1024], "y_test": y[:1024]}
    data = Dataset(arrays, {"task": "classification", "n_classes": 10, "input_shape": [features],
                            "data_version": "synthetic", "counts": {"train": n, "val": 1024, "test": 1024}})
    card = "cpu (dry run)" if dry else torch.cuda.get_device_name(device)
    print(f"{card}, torch {torch.__version__}; MLP {features}-{width}x{depth}-10, batch {batch}, bf16 autocast, "
          f"{steps - WARMUP} timed steps of {steps}, {args.repeats} repeats", flush=True)
    sizes = (features, width, depth)
    runs = {"hand-written": lambda: hand_written(data, sizes, batch, steps, device),
            "fit, defaults": lambda: ours(data, sizes, batch, steps, device, noise=True),
            "fit, noise scale off": lambda: ours(data, sizes, batch, steps, device, noise=False)}
    for run in runs.values():  # warm-up: every path once
        run()
    rates = {name: [] for name in runs}
    for r in range(args.repeats):
        for name in list(runs) if r % 2 == 0 else list(runs)[::-1]:
            rates[name].append(runs[name]())
    ratios = {name: [ours_rate / hand for ours_rate, hand in zip(rates[name], rates["hand-written"])]
              for name in runs if name != "hand-written"}
    report = {"device": card, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
              "model": {"features": features, "width": width, "depth": depth}, "batch": batch, "precision": "bf16",
              "timed_steps": steps - WARMUP, "samples_per_s": rates,
              "ratio_to_hand_written": {name: {"median": statistics.median(v), "all": v} for name, v in ratios.items()}}
    for name in runs:
        print(f"  {name}: {statistics.median(rates[name]):,.0f} samples/s (median)")
    for name, v in ratios.items():
        print(f"{name} / hand-written: {statistics.median(v):.3f}x (repeats: {', '.join(f'{r:.3f}' for r in v)}); "
              f"goal >= 0.97x")
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
