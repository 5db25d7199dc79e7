"""Training-loop overhead: components.training.fit against a hand-written PyTorch loop doing
the same steps (digits, the default MLP, batch 32, SGD, a validation pass per epoch).

fit runs as in the pipeline: metrics.jsonl row per step, checkpoints every 200 steps, W&B
offline (a row per evaluation). Both loops alternate in this one
process, so machine noise hits both. Noise only ever adds time, so the headline is the ratio
of the fastest runs; the ratio of medians is printed beside it.

    .venv/bin/python bench/train_loop_overhead.py [--epochs 10] [--repeats 7]
"""

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from components import datasets, models, training  # noqa: E402
from components.config import Config, parse_config  # noqa: E402
from components.tracking import Tracker  # noqa: E402

# CPU seconds of this process (all its threads): steadier than wall time on a shared machine,
# and what a loop's overhead costs. `--wall` switches to wall-clock time.
CLOCK = time.process_time


def hand_written(cfg: Config, data, steps_per_epoch: int, epochs: int) -> float:
    x, y = (torch.as_tensor(a) for a in data.split("train"))
    xv, yv = (torch.as_tensor(a) for a in data.split("val"))
    torch.manual_seed(0)
    model = models.build_model(cfg.model, data.input_shape, data.output_dim)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.train.lr, momentum=cfg.train.momentum)
    batch = cfg.train.batch_size
    start = CLOCK()
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))
        for i in range(steps_per_epoch):
            idx = order[i * batch:(i + 1) * batch]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            model.eval()
            (model(xv).argmax(1) == yv).float().mean().item()
            model.train()
    return CLOCK() - start


ONE_TIME = []  # W&B run start + finish, measured apart from the loop


def ours(cfg: Config, data, run_dir: Path) -> float:
    torch.manual_seed(0)
    model = models.build_model(cfg.model, data.input_shape, data.output_dim)
    start = CLOCK()
    tracker = Tracker(cfg.tracking, run_dir, run_dir.name, "train", cfg.to_dict())
    started = CLOCK() - start
    # The W&B service finishes starting the run in the background for a moment after init;
    # let it settle so the loop's per-step cost is what gets measured.
    time.sleep(1.0 if tracker.run is not None else 0.0)
    start = CLOCK()
    training.fit(model, data, cfg, run_dir, tracker, progress=False)
    elapsed = CLOCK() - start
    finish = CLOCK()
    tracker.finish()
    ONE_TIME.append(started + CLOCK() - finish)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--wall", action="store_true", help="wall-clock time instead of CPU time")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.wall:
        global CLOCK
        CLOCK = time.perf_counter
    os.environ.setdefault("WANDB_SILENT", "true")
    if args.threads:
        torch.set_num_threads(args.threads)

    def make(mode: str) -> Config:
        raw = Config().to_dict()
        raw["train"].update(max_epochs=args.epochs, batch_size=32, micro_batch_size=32)
        raw["eval"].update(patience=10_000)  # same number of steps in every loop
        raw["tracking"].update(mode=mode)
        return parse_config(raw)

    configs = {"disabled": make("disabled"), "offline": make("offline")}
    data = datasets.build(configs["offline"].data)
    steps_per_epoch = data.manifest["counts"]["train"] // configs["offline"].train.batch_size
    times = {"hand": [], "disabled": [], "offline": []}
    with tempfile.TemporaryDirectory() as tmp:
        hand_written(configs["offline"], data, steps_per_epoch, 1)  # warm-up every path
        for mode, cfg in configs.items():
            ours(cfg, data, Path(tmp) / f"warmup-{mode}")
        for r in range(args.repeats):
            runs = ["hand", *configs]
            for name in runs if r % 2 == 0 else runs[::-1]:  # alternate the order: no loop always goes first
                if name == "hand":
                    times[name].append(hand_written(configs["offline"], data, steps_per_epoch, args.epochs))
                else:
                    times[name].append(ours(configs[name], data, Path(tmp) / f"{name}-{r}"))

    steps = steps_per_epoch * args.epochs
    print(f"machine: {platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {time.strftime('%Y-%m-%d')}")
    print(f"clock: {'wall' if args.wall else 'process CPU time'}")
    print(f"digits MLP, batch 32, {steps} steps ({args.epochs} epochs, a validation pass per epoch), "
          f"{args.repeats} interleaved repeats")
    base = min(times["hand"])
    print(f"hand-written loop:            {base:.3f} s fastest ({1e3 * base / steps:.3f} ms/step)")
    for mode in configs:
        fastest = min(times[mode])
        print(f"training.fit, tracking {mode:8s}: {fastest:.3f} s fastest ({1e3 * fastest / steps:.3f} ms/step): "
              f"{fastest / base:.3f}x fastest, {statistics.median(times[mode]) / statistics.median(times['hand']):.3f}x "
              "median (goal <= 1.05x)")
    print(f"W&B run start + finish (one-time, outside the loop): {statistics.median(ONE_TIME):.2f} s")


if __name__ == "__main__":
    main()
