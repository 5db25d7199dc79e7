"""Training-loop overhead: components.training.fit against a hand-written PyTorch loop doing
the same steps (digits, the default MLP, SGD, a validation pass per epoch): batch 32 against a
bare loop; batch 32 with W&B offline (the issue's goal), where the hand-written loop also logs to
W&B once per epoch and saves checkpoints where fit does; and batch 128 accumulated as 32 x 4
with noise-scale tracking off and on, against a loop with the same checkpoints.

fit runs as in the pipeline: a metrics.jsonl row per step, a checkpoint at the end (and once a
minute, so not within these short runs), and with tracking offline the W&B run written after
training (off the clock, as components.train does), while the hand-written loop logs to W&B live
once per epoch, as people write it. fit steps torch's fused optimizer (components/plan.py); the
hand-written loop steps torch.optim.SGD's default, except in the row that gives it fit's optimizer
step too. The loops alternate in this one process, so machine noise hits all of them. The headline is the median over repeats of the ratio within a repeat (both loops back to
back), with its quartiles; the ratio of the fastest runs is printed beside it. See CLOCKS below for
the clock.

    .venv/bin/python bench/train_loop_overhead.py [--epochs 10] [--repeats 21]
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
from components import datasets, models, storage, tracking, training  # noqa: E402
from components.config import Config, parse_config  # noqa: E402
from components.tracking import Tracker  # noqa: E402

# Which clock: "thread" (CPU time of this thread, with torch on 1 thread so all the work is on
# it: time the machine gives to other tenants is not counted; the steadiest here), "process"
# (CPU time of all threads; torch's idle threads spin, which inflates it) or "wall".
CLOCKS = {"thread": time.thread_time, "process": time.process_time, "wall": time.perf_counter}
CLOCK = time.thread_time


def bench_config(epochs: int, tracking: str = "disabled", batch: int = 32, micro: int = 32,
                 noise: bool = True, checkpoint_every_steps: int = None) -> Config:
    """The default config with the loop's knobs set; patience off, so every loop runs every step.
    By default fit checkpoints once a minute, so within these runs only at the end."""
    raw = Config().to_dict()
    raw["train"].update(max_epochs=epochs, batch_size=batch, micro_batch_size=micro, track_noise_scale=noise,
                        lr_scaling="none", checkpoint_every_steps=checkpoint_every_steps)
    raw["eval"].update(patience=10_000)
    raw["tracking"].update(mode=tracking)
    return parse_config(raw)


def hand_written(cfg: Config, data, steps_per_epoch: int, epochs: int, run_dir: Path = None,
                 checkpoints: bool = False, fused: bool = False) -> float:
    """The reference loop. With tracking on (cfg.tracking.mode), it logs to its own W&B run once
    per epoch, as a hand-written loop with W&B would, so both loops pay for W&B alike. With
    `checkpoints`, it saves model and optimizer at the end and every train.checkpoint_every_steps
    if set (plain torch.save, as people write it), as fit does for resuming. With `fused`, its
    optimizer step is fit's (fused SGD, gradients set to None without zero_grad's hooks), so the
    ratio shows fit's bookkeeping alone."""
    wandb_run = None
    if cfg.tracking.mode != "disabled":
        import wandb

        wandb_run = wandb.init(mode=cfg.tracking.mode, project=cfg.tracking.project, dir=str(run_dir),
                               settings=wandb.Settings(silent=True, console="off", x_disable_stats=True,
                                                       x_disable_machine_info=True, disable_git=True,
                                                       disable_code=True))
        time.sleep(1.0)  # as in ours(): let the W&B service settle before the clock starts
    torch.manual_seed(0)
    model = models.build_model(cfg.model, data.input_shape, data.output_dim)
    # From here on the same work as fit's clock: the split's tensors, the optimizer, the loop.
    start = CLOCK()
    x, y = (torch.as_tensor(a) for a in data.split("train"))
    xv, yv = (torch.as_tensor(a) for a in data.split("val"))
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=cfg.train.lr, momentum=cfg.train.momentum, fused=fused)
    batch, micro = cfg.train.batch_size, cfg.train.micro_batch_size
    k = batch // micro
    every = cfg.train.checkpoint_every_steps if checkpoints else None
    step = 0
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))
        for i in range(steps_per_epoch):
            idx = order[i * batch:(i + 1) * batch]
            if fused:
                for p in params:
                    p.grad = None
            else:
                opt.zero_grad()
            if k == 1:
                F.cross_entropy(model(x[idx]), y[idx]).backward()
            else:
                for m in range(0, batch, micro):
                    (F.cross_entropy(model(x[idx[m:m + micro]]), y[idx[m:m + micro]]) / k).backward()
            opt.step()
            step += 1
            if every and step % every == 0:
                torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step},
                           run_dir / "checkpoint.pt")
        with torch.no_grad():
            model.eval()
            accuracy = (model(xv).argmax(1) == yv).float().mean().item()
            model.train()
        if wandb_run is not None:
            wandb_run.log({"epoch": epoch, "val/accuracy": accuracy})
    if checkpoints:
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step},
                   run_dir / "checkpoint.pt")
    elapsed = CLOCK() - start
    if wandb_run is not None:
        wandb_run.finish()
    return elapsed


def ours(cfg: Config, data, run_dir: Path) -> float:
    """fit as components.train runs it: with tracking offline the W&B run is written after
    training from metrics.jsonl (tracking.replay), so it is not on the clock."""
    torch.manual_seed(0)
    model = models.build_model(cfg.model, data.input_shape, data.output_dim)
    start = CLOCK()
    training.fit(model, data, cfg, run_dir, None, progress=False)
    elapsed = CLOCK() - start
    tracker = Tracker(cfg.tracking, run_dir, run_dir.name, "train", cfg.to_dict())
    if tracker.run is not None:
        tracking.replay(tracker, storage.read_jsonl(run_dir / training.METRICS))
    tracker.finish()
    return elapsed


def per_step_cost(cfg_for, data, repeats: int) -> dict:
    """Seconds per optimizer step, from the slope between a short and a long run (fastest of
    `repeats` each): one-time costs (setup, the final checkpoint) cancel out."""
    out = {}
    steps_per_epoch = data.manifest["counts"]["train"] // 32
    for name in ("hand", "fit"):
        times = {}
        for epochs in (5, 25):
            cfg = cfg_for(epochs)
            if name == "hand":
                times[epochs] = min(hand_written(cfg, data, steps_per_epoch, epochs) for _ in range(repeats))
            else:
                with tempfile.TemporaryDirectory() as tmp:
                    times[epochs] = min(ours(cfg, data, Path(tmp) / f"p{r}") for r in range(repeats))
        out[name] = (times[25] - times[5]) / (20 * steps_per_epoch)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="thread")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: 1 with --clock thread, else torch's choice)")
    args = parser.parse_args()
    global CLOCK
    CLOCK = CLOCKS[args.clock]
    if args.threads is None and args.clock == "thread":
        args.threads = 1
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.pop("WANDB_MODE", None)
    if args.threads:
        torch.set_num_threads(args.threads)

    def make(tracking: str, batch: int = 32, micro: int = 32, noise: bool = True, every: int = None) -> Config:
        return bench_config(args.epochs, tracking, batch, micro, noise, every)

    # (hand-written reference, whether it checkpoints too, whether it steps fit's fused optimizer,
    # fit variants). The goals (issue 9), against the loop as people write it (torch.optim.SGD's
    # defaults): the bare loop (1.10x, fit as configured by default, noise scale on); the loop doing
    # the same I/O (1.05x: batch 32 with W&B, and 32 x 4 with the noise scale off); 32 x 4 with the
    # noise scale on (1.10x). The step-checkpoint rows show what one of fit's checkpoints costs; the
    # fused-reference row, what fit's bookkeeping costs once both step the same optimizer.
    scenarios = {
        "batch 32, bare reference": (make("disabled"), False, False, {
            "fit, defaults (noise on)": make("disabled"), "fit, noise scale off": make("disabled", noise=False)}),
        "batch 32, bare reference stepping fit's fused optimizer": (make("disabled"), False, True, {
            "fit, defaults (noise on)": make("disabled"), "fit, noise scale off": make("disabled", noise=False)}),
        "batch 32, tracking offline (the reference logs to W&B live), checkpoints in both": (
            make("offline"), True, False, {"fit, tracking offline": make("offline")}),
        "batch 32, noise off, a checkpoint every 100 steps in both": (
            make("disabled", noise=False, every=100), True, False, {"fit": make("disabled", noise=False, every=100)}),
        "batch 128 = 32 x 4, checkpoints in both loops": (make("disabled", 128, 32), True, False, {
            "fit, noise scale off": make("disabled", 128, 32, noise=False),
            "fit, noise scale on": make("disabled", 128, 32, noise=True)}),
    }
    data = datasets.build(make("disabled").data)
    print(f"machine: {platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {time.strftime('%Y-%m-%d')}; "
          f"clock: {args.clock}")
    with tempfile.TemporaryDirectory() as tmp:
        for n, (scenario, (reference, checkpoints, fused, variants)) in enumerate(scenarios.items()):
            steps_per_epoch = data.manifest["counts"]["train"] // reference.train.batch_size
            times = {"hand": [], **{name: [] for name in variants}}
            hand_dir = Path(tmp) / f"hand-{n}"
            hand_dir.mkdir()
            hand_written(reference, data, steps_per_epoch, 1, hand_dir, checkpoints, fused)  # warm-up every path
            for i, cfg in enumerate(variants.values()):
                ours(cfg, data, Path(tmp) / f"warmup-{n}-{i}")
            for r in range(args.repeats):
                runs = ["hand", *variants]
                for name in runs if r % 2 == 0 else runs[::-1]:  # alternate: no loop always goes first
                    if name == "hand":
                        times[name].append(hand_written(reference, data, steps_per_epoch, args.epochs, hand_dir,
                                                        checkpoints, fused))
                    else:
                        run_dir = Path(tmp) / f"s{n}-{list(variants).index(name)}-{r}"
                        times[name].append(ours(variants[name], data, run_dir))
            steps = steps_per_epoch * args.epochs
            print(f"\ndigits MLP, {scenario}, {steps} steps ({args.epochs} epochs, a validation pass per epoch), "
                  f"{args.repeats} interleaved repeats")
            base = min(times["hand"])
            print(f"  hand-written loop:         {base:.3f} s fastest ({1e3 * base / steps:.3f} ms/step)")
            for name in variants:
                fastest = min(times[name])
                # Each repeat runs both loops back to back, so the ratio within a repeat cancels the
                # machine's slow drifts; the median of those ratios ignores the repeats a burst hit.
                paired = sorted(o / h for o, h in zip(times[name], times["hand"]))
                quartiles = statistics.quantiles(paired, n=4)
                print(f"  {name:26s} {fastest:.3f} s fastest ({1e3 * fastest / steps:.3f} ms/step): "
                      f"{statistics.median(paired):.3f}x paired median (quartiles {quartiles[0]:.3f}-"
                      f"{quartiles[2]:.3f}), {fastest / base:.3f}x fastest")
    slope = per_step_cost(bench_config, data, max(3, args.repeats // 3))
    print(f"\nper-step cost, batch 32, tracking disabled (slope between 5 and 25 epochs): hand-written "
          f"{1e6 * slope['hand']:.1f} us, fit {1e6 * slope['fit']:.1f} us: {slope['fit'] / slope['hand']:.3f}x")


if __name__ == "__main__":
    main()
