"""The training loop, meant to be read in one sitting.

Words (see GUIDE.md): a micro-batch is what one forward/backward sees; `accumulation_steps`
micro-batches are summed into one optimizer step (iteration); the effective batch is
micro-batch x accumulation steps x world size; an epoch is one pass over the train split.

Last incomplete window: each epoch is a fresh permutation cut into windows of exactly
the effective batch; the remainder (fewer than `batch_size` examples) is dropped. Every
optimizer step therefore sees the same number of examples, samples_seen = steps x batch,
and no example is systematically left out because the next epoch reshuffles.

Rank-aware in shape: each window is cut into `world_size` shards and this process trains
on shard `rank`; with one process that is the whole window.
"""

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, List, Optional

import torch
from torch import nn

from components import early_stopping, memory, metrics, noise_scale, storage, tracking
from components.config import Config, TrainConfig, config_hash, largest_divisor_at_most
from components.datasets import Dataset
from components.errors import ConfigError

CHECKPOINT = "checkpoints/last.pt"
METRICS = "metrics.jsonl"

# The row of every optimizer step, formatted directly: json.dumps took ~4x longer, and on a small
# model it was the loop's largest cost after torch. Every value reads back exactly: %.17g
# round-trips any double without the search for its shortest repr (slow, and a float32 loss
# read as a double needs 16-17 digits anyway). A non-finite loss (bare nan here) goes through
# json.dumps.
STEP_ROW = ('{"step": %d, "samples_seen": %d, "epoch": %r, "wall_time_s": %.4f, '
            '"train/loss": %.17g, "lr": %r}\n')


@dataclass
class Plan:
    """What one run will do, fixed before the first step."""

    effective_batch_size: int
    micro_batch_size: int
    accumulation_steps: int
    world_size: int
    n_train: int
    steps_per_epoch: int
    max_steps: int  # the binding limit: train.max_steps or max_epochs x steps_per_epoch
    limit: str  # which limit binds: "max_steps" or "max_epochs"
    eval_every_steps: int
    lr: float  # peak learning rate after scaling to the effective batch

    @classmethod
    def make(cls, cfg: Config, n_train: int) -> "Plan":
        t = cfg.train
        if t.batch_size > n_train:
            raise ConfigError(f"train.batch_size: effective batch {t.batch_size} is larger than the "
                              f"training split ({n_train} examples)")
        steps_per_epoch = n_train // t.batch_size
        epoch_limit = t.max_epochs * steps_per_epoch
        by_steps = t.max_steps is not None and t.max_steps <= epoch_limit
        return cls(
            effective_batch_size=t.batch_size, micro_batch_size=t.micro_batch_size,
            accumulation_steps=cfg.accumulation_steps, world_size=cfg.world_size, n_train=n_train,
            steps_per_epoch=steps_per_epoch, max_steps=t.max_steps if by_steps else epoch_limit,
            limit=early_stopping.MAX_STEPS if by_steps else early_stopping.MAX_EPOCHS,
            eval_every_steps=cfg.eval.every_steps or steps_per_epoch,
            lr=scaled_lr(t.lr, t.batch_size, t.base_batch_size, t.lr_scaling),
        )


def scaled_lr(lr: float, batch: int, base_batch: int, rule: str) -> float:
    """Linear: lr x B/B0 (Goyal et al. 2017). Sqrt: lr x sqrt(B/B0) (Krizhevsky 2014; Adam-like)."""
    exponent = {"none": 0.0, "sqrt": 0.5, "linear": 1.0}[rule]
    return lr * (batch / base_batch) ** exponent


def lr_at(step: int, peak: float, t: TrainConfig, total_steps: int) -> float:
    """LR for the update that follows `step` completed steps: linear warmup, then constant or
    cosine decay to zero at `total_steps`."""
    if step < t.warmup_steps:
        return peak * (step + 1) / t.warmup_steps
    if t.schedule == "cosine":
        progress = (step - t.warmup_steps) / max(1, total_steps - t.warmup_steps)
        return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return peak


def epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The permutation for one epoch, a pure function of (seed, epoch): a resumed run
    draws the same examples without replaying earlier epochs."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen)


def make_optimizer(model: nn.Module, t: TrainConfig, lr: float) -> torch.optim.Optimizer:
    if t.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=t.momentum, weight_decay=t.weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=t.weight_decay)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: cuda requested but no CUDA device is available")
    return torch.device(name)


def accumulate_gradients(model: nn.Module, loss_fn, x: torch.Tensor, y: torch.Tensor, indices: torch.Tensor,
                         micro: int, noise: Optional[noise_scale.NoiseScaleTracker] = None) -> List[torch.Tensor]:
    """Forward/backward over `indices` in micro-batches of `micro`, summing into .grad.

    Micro-batches are equal-sized (`micro` divides len(indices)), so dividing each mean loss by
    their count makes the summed gradient the mean over all of `indices`: the same update as
    one forward/backward over the whole batch. With `noise`, the gradient norm after the first
    micro-batch (count^2 x |.grad|^2 is that micro-batch's own |g|^2) and after the last (the
    whole batch's) feed the noise-scale estimate: two norms per step, no copies.
    """
    n = indices.shape[0]
    count = n // micro
    losses, first_norms = [], None
    params = list(model.parameters()) if noise is not None else None
    for m in range(0, n, micro):
        mb = indices[m:m + micro] if count > 1 else indices
        loss = loss_fn(model(x[mb]), y[mb])
        (loss / count if count > 1 else loss).backward()
        losses.append(loss.detach())
        if noise is not None and first_norms is None:
            first_norms = noise_scale.grad_norms(params)
    if noise is not None:
        first_sq, big_sq = noise_scale.squared_totals(first_norms, noise_scale.grad_norms(params))
        noise.update([first_sq * count ** 2], big_sq, micro, n)
    return losses


@dataclass
class FitResult:
    plan: Plan
    optimizer_steps: int
    samples_seen: int
    epochs: float
    wall_time_s: float
    stop_reason: str
    best_metric: dict  # {name, value, step}
    steps_to_target: Optional[int]
    samples_to_target: Optional[int]
    time_to_target_s: Optional[float]
    resumed_from_step: Optional[int]
    micro_batch_size: int  # at the end: smaller than planned after an out-of-memory retry
    accumulation_steps: int
    oom_events: List[dict] = field(default_factory=list)
    gns_b_simple: Optional[float] = None  # noise scale tracked during training (accumulation >= 2)
    eval_time_s: float = 0.0  # of wall_time_s, spent evaluating
    train_time_to_target_s: Optional[float] = None  # time_to_target_s less the evaluations before it

    def to_dict(self) -> dict:
        out = asdict(self)
        plan = out.pop("plan")
        return {**plan, **out}


def fit(model: nn.Module, data: Dataset, cfg: Config, run_dir: Optional[Path] = None,
        tracker: Optional[tracking.Tracker] = None, progress: Optional[bool] = None,
        on_step: Optional[Callable[[int], None]] = None, rank: int = 0) -> FitResult:
    """Train `model` in place and leave the best weights (by `eval.monitor`) loaded in it.

    With `run_dir`, metrics go to metrics.jsonl and checkpoints to checkpoints/last.pt;
    calling again with the same run_dir resumes from the last checkpoint. `progress=None`
    shows a bar only on a terminal. `on_step(step)` runs after every optimizer step.
    """
    t, e = cfg.train, cfg.eval
    device = resolve_device(t.device)
    x_train, y_train = (torch.as_tensor(a).to(device) for a in data.split("train"))
    x_val, y_val = (torch.as_tensor(a).to(device) for a in data.split("val"))
    plan = Plan.make(cfg, len(x_train))
    loss_fn = metrics.loss_fn(data.task)
    n_classes = data.manifest["n_classes"] or 0
    shard = plan.effective_batch_size // plan.world_size  # examples this rank sees per step
    micro = plan.micro_batch_size  # halves on out-of-memory; the effective batch never changes
    oom_events: List[dict] = []
    noise = noise_scale.NoiseScaleTracker(population=plan.n_train) if t.track_noise_scale else None

    model.to(device).train()
    optimizer = make_optimizer(model, t, plan.lr)
    stopper = early_stopping.EarlyStopping(e.mode, e.patience, e.min_delta, e.target, e.divergence_threshold,
                                           e.stop_at_target)
    step, elapsed_before, best_state, target_at, resumed_from, finished = 0, 0.0, None, None, None, False
    eval_s = 0.0  # wall time spent evaluating: a study evaluates often, and that is not training
    log = storage.JsonlWriter(Path(run_dir) / METRICS) if run_dir else None
    identity = {"config_hash": config_hash(cfg), "data_version": data.data_version}

    checkpoint_path = Path(run_dir) / CHECKPOINT if run_dir else None
    if checkpoint_path is not None and checkpoint_path.exists():
        ckpt = storage.load_torch(checkpoint_path)
        for key, value in identity.items():
            if ckpt[key] != value:
                raise ConfigError(f"run_id: {run_dir} holds a run with a different {key} "
                                  f"({ckpt[key]} != {value}); choose another run_id")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        stopper.load_state_dict(ckpt["stopper"])
        torch.set_rng_state(ckpt["rng"])
        step, elapsed_before, best_state, target_at = ckpt["step"], ckpt["wall_time_s"], ckpt["best_state"], ckpt["target_at"]
        micro, oom_events, eval_s = ckpt["micro_batch_size"], ckpt["oom_events"], ckpt["eval_time_s"]
        if noise is not None:
            vars(noise).update(ckpt["noise"])
        resumed_from, finished = step, ckpt["finished"]
        if log:
            log.truncate(ckpt["metrics_offset"])  # rows after the checkpoint are written again
    else:
        torch.manual_seed(t.seed)  # dropout draws; the model was initialised by the caller

    def save_checkpoint(finished: bool) -> None:
        if checkpoint_path is None or rank != 0:
            return
        storage.save_torch({
            **identity, "step": step, "finished": finished, "wall_time_s": elapsed(),
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "stopper": stopper.state_dict(), "rng": torch.get_rng_state(),
            "best_state": best_state, "target_at": target_at, "micro_batch_size": micro, "oom_events": oom_events,
            "eval_time_s": eval_s,
            "noise": vars(noise) if noise is not None else None,
            "metrics_offset": log.offset() if log else 0,
        }, checkpoint_path)

    def row(extra: dict) -> dict:
        return {"step": step, "samples_seen": step * plan.effective_batch_size,
                "epoch": step / plan.steps_per_epoch, "wall_time_s": round(elapsed(), 4), **extra}

    def evaluate() -> None:
        nonlocal best_state, target_at, eval_chunk, eval_s
        started = time.perf_counter()
        # no activations are kept for backward, so big chunks usually fit; halve if not
        values, eval_chunk = memory.halving_on_oom(
            lambda chunk: metrics.evaluate(model, x_val, y_val, data.task, n_classes, chunk=chunk), eval_chunk)
        if noise is not None and noise.value is not None:
            values["gns/b_simple"] = noise.value
        had_target = stopper.target_step is not None
        if stopper.update(values[e.monitor], step):
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if not had_target and stopper.target_step is not None:
            now = elapsed()
            target_at = {"steps": step, "samples": step * plan.effective_batch_size, "time_s": now,
                         "train_time_s": now - eval_s - (time.perf_counter() - started)}
        out = row(values)
        if log:
            log.write(out)
            log.flush()
        if tracker:  # one W&B call per evaluation, carrying the train loss since the last one
            tracker.log(tracking.eval_row(out, loss_since_eval, optimizer.param_groups[0]["lr"]))
        loss_since_eval.clear()
        if not bar.disable:
            bar.set_postfix({"train/loss": f"{train_loss:.4f}", e.monitor: f"{values[e.monitor]:.4f}"}, refresh=False)
        eval_s += time.perf_counter() - started

    from tqdm.auto import tqdm

    bar = tqdm(total=plan.max_steps, initial=step, unit="step", desc="train",
               disable=(None if progress is None else not progress))
    t0 = time.perf_counter()

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - t0

    # One optimizer step's forward/backward at micro-batch m, over the current `indices`. Defined
    # once, outside the hot loop; they read the loop's variables when called.
    def micro_steps(m: int) -> List[torch.Tensor]:
        measure = noise if m < shard and step % t.noise_scale_every_steps == 0 else None
        return accumulate_gradients(model, loss_fn, x_train, y_train, indices, m, measure)

    def smaller_micro(m: int) -> int:
        return largest_divisor_at_most(shard, m // 2)

    def on_oom(old: int, new: int) -> None:
        # Out of memory (variable inputs, fragmentation): redo this step with a smaller
        # micro-batch and more accumulation: the same update, the same effective batch.
        optimizer.zero_grad(set_to_none=True)
        oom_events.append({"step": step + 1, "from": old, "to": new})
        if log:
            log.write(row({"event": "out_of_memory", "micro_batch_size": new, "accumulation_steps": shard // new}))

    train_loss, last_eval_step, last_flush, eval_chunk = float("nan"), step, t0, 4096
    loss_since_eval: List[float] = []  # train losses since the last evaluation, for W&B
    while not finished and not stopper.should_stop and step < plan.max_steps:
        epoch, first_window = divmod(step, plan.steps_per_epoch)
        order = epoch_order(t.seed, epoch, plan.n_train).to(device)
        for window in range(first_window, plan.steps_per_epoch):
            start = window * plan.effective_batch_size + rank * shard
            indices = order[start:start + shard]
            lr = lr_at(step, plan.lr, t, plan.max_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr

            losses, micro = memory.halving_on_oom(micro_steps, micro, smaller_micro, on_oom)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            # one host sync per step (per-step Python and tensor ops show up in the loop's cost)
            train_loss = (torch.stack(losses).mean() if len(losses) > 1 else losses[0]).item()
            if tracker:
                loss_since_eval.append(train_loss)
            # a dict only for W&B following live or a non-finite loss; otherwise the fast row
            out = row({"train/loss": train_loss, "lr": lr}) if tracker or not math.isfinite(train_loss) else None
            if log and out is None:
                log.write_line(STEP_ROW % (step, step * plan.effective_batch_size, step / plan.steps_per_epoch,
                                           elapsed(), train_loss, lr))
            elif log:
                log.write(out)
            if tracker:
                tracker.log_train(out)
            bar.update()
            if on_step:
                on_step(step)
            if not math.isfinite(train_loss):
                stopper.non_finite_loss()
                break
            if step % plan.eval_every_steps == 0 or step == plan.max_steps:
                evaluate()
                last_eval_step = step
            if t.checkpoint_every_steps and step % t.checkpoint_every_steps == 0:
                save_checkpoint(finished=False)
            if stopper.should_stop or step >= plan.max_steps:
                break
            if log and time.perf_counter() - last_flush > 0.5:  # keeps progress readers current
                log.flush()
                last_flush = time.perf_counter()

    if not finished:
        if last_eval_step != step and stopper.stop_reason != early_stopping.NON_FINITE:
            evaluate()  # the last steps count toward the best weights too
        finished = True
        save_checkpoint(finished=True)
    bar.close()
    if log:
        log.close()
    if best_state is not None:
        model.load_state_dict(best_state)

    return FitResult(
        plan=plan, optimizer_steps=step, samples_seen=step * plan.effective_batch_size,
        epochs=step / plan.steps_per_epoch, wall_time_s=elapsed(),
        stop_reason=stopper.stop_reason or plan.limit,
        best_metric={"name": e.monitor, "value": stopper.best, "step": stopper.best_step},
        steps_to_target=target_at["steps"] if target_at else None,
        samples_to_target=target_at["samples"] if target_at else None,
        time_to_target_s=target_at["time_s"] if target_at else None,
        resumed_from_step=resumed_from, micro_batch_size=micro, accumulation_steps=shard // micro,
        oom_events=oom_events, gns_b_simple=noise.value if noise is not None else None, eval_time_s=eval_s,
        train_time_to_target_s=target_at["train_time_s"] if target_at else None,
    )
