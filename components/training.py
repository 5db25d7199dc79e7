"""The training loop, meant to be read in one sitting.

Words (see GUIDE.md): a micro-batch is what one forward/backward sees; `accumulation_steps`
micro-batches are summed into one optimizer step (iteration); the effective batch is
micro-batch x accumulation steps x world size; an epoch is one pass over the train split.

Last incomplete window: each epoch is a fresh permutation cut into windows of exactly
the effective batch; the remainder (fewer than `batch_size` examples) is dropped. Every
optimizer step therefore sees the same number of examples, samples_seen = steps x batch,
and no example is systematically left out because the next epoch reshuffles.

Across ranks (torchrun; components/distributed.py): each window is cut into `world_size`
shards and this process trains on shard `rank`; with one process that is the whole window.
Every micro-step accumulates locally; then one all-reduce per step averages the gradients and
carries the step's loss and an out-of-memory flag. The flag is why this is not
DistributedDataParallel: DDP reduces inside the last micro-step's backward, so a rank that runs
out of memory before it leaves the others waiting in that all-reduce (the deadlock Composer
had); here every rank reaches the one collective, and if any ran out of memory all of them
halve the micro-batch and redo the step. Rank 0 evaluates and broadcasts the numbers, so every
rank's stopping rules take the same decisions; only rank 0 writes. A checkpoint resumes with
another world size at the same effective batch (Trainer._regroup): the windows are the same, so
is each step's data, and the accumulation makes up the difference.

Precision (train.precision, components/precision.py): forward and loss under autocast; with fp16
the scaled loss is backpropagated and a step whose gradients overflow is skipped (a
"skipped_step" row in metrics.jsonl); noise-scale norms are unscaled first.
"""

import math
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional

import torch
from torch import nn

from components import distributed, early_stopping, memory, metrics, noise_scale, storage, tracking
from components.config import (Config, TrainConfig, config_hash, for_dataset, largest_divisor_at_most,
                               parse_config)
from components.datasets import Dataset
from components.errors import ConfigError
from components.precision import Precision
from components.run_record import RunRecord

CHECKPOINT = "checkpoints/last.pt"
NOISE_EVERY, NOISE_EVERY_SPLIT = 4, 16  # default noise-measuring interval (train.noise_scale_every_steps)
METRICS = "metrics.jsonl"

# The row of every optimizer step, formatted directly: json.dumps took ~4x longer, and on a small
# model it was the loop's largest cost after torch. Every value reads back exactly: %.17g
# round-trips any double without the search for its shortest repr (slow, and a float32 loss
# read as a double needs 16-17 digits anyway). A non-finite loss goes through
# JsonlWriter.write, which writes it as null (strict JSON).
STEP_ROW = ('{"step": %d, "samples_seen": %d, "epoch": %r, "wall_time_s": %.6f, '
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
                         micro: int, noise: Optional[noise_scale.NoiseScaleTracker] = None,
                         precision: Optional[Precision] = None) -> List[torch.Tensor]:
    """Forward/backward over `indices` in micro-batches of `micro`, summing into .grad.

    Micro-batches are equal-sized (`micro` divides len(indices)), so dividing each mean loss by
    their count makes the summed gradient the mean over all of `indices`: the same update as
    one forward/backward over the whole batch. With `noise`, the gradient norm after the first
    micro-batch (count^2 x |.grad|^2 is that micro-batch's own |g|^2) and after the last (the
    whole batch's) feed the noise-scale estimate: two norms per step, no copies. `precision`:
    autocast and (fp16) loss scaling (components/precision.py); None: fp32.
    """
    losses, first_norms = backward_micro_batches(model, loss_fn, x, y, indices, micro, noise is not None, precision)
    if noise is not None:
        count = indices.shape[0] // micro
        first_sq, big_sq = noise_scale.squared_totals(first_norms, noise_scale.grad_norms(model.parameters()))
        feed_noise(noise, precision, first_sq * count ** 2, big_sq, micro, indices.shape[0])
    return losses


def feed_noise(noise: noise_scale.NoiseScaleTracker, precision: Optional[Precision], small_sq: float, big_sq: float,
               micro: int, batch: int) -> None:
    """One measured step's squared norms into the estimate, unscaled from fp16's loss scale."""
    if precision is not None and precision.scaler is not None:
        small_sq, big_sq = precision.unscaled_sq(small_sq), precision.unscaled_sq(big_sq)
        if not (math.isfinite(small_sq) and math.isfinite(big_sq)):
            return  # an overflowing step: the scaler skips it, and so does the estimate
    noise.update([small_sq], big_sq, micro, batch)


def backward_micro_batches(model: nn.Module, loss_fn, x: torch.Tensor, y: torch.Tensor, indices: torch.Tensor,
                           micro: int, measure: bool = False, precision: Optional[Precision] = None):
    """accumulate_gradients' micro-steps: (the micro-batch losses, and with `measure` the
    per-tensor gradient norms after the first micro-batch). Forward and loss under the
    precision's autocast; backward of the (fp16: scaled) loss outside it, as torch advises."""
    n = indices.shape[0]
    count = n // micro
    losses, first_norms = [], None
    params = list(model.parameters()) if measure else None
    for m in range(0, n, micro):
        mb = indices[m:m + micro] if count > 1 else indices
        if precision is None:  # fp32: no context or wrapper calls in the step (they showed in the loop ratio)
            loss = loss_fn(model(x[mb]), y[mb])
            (loss / count if count > 1 else loss).backward()
        else:
            with precision.autocast():
                loss = loss_fn(model(x[mb]), y[mb])
            precision.backward(loss / count if count > 1 else loss)
        losses.append(loss)  # read with .item(): no detach needed (it cost ~1% of the loop)
        if measure and first_norms is None:
            first_norms = noise_scale.grad_norms(params)
    return losses, first_norms


def measuring_micro(shard: int, micro: int) -> Optional[int]:
    """The micro-batch of a noise-measuring step. With accumulation, the step's own; with one
    micro-batch per step, the batch split into two equal halves (or, for an odd batch, the fewest
    equal parts, at most 4): the same update (accumulation is exact), and the first part's
    gradient is the small-batch norm B_simple needs. None when no such split exists."""
    if micro < shard:
        return micro
    half = largest_divisor_at_most(shard, shard // 2) if shard > 1 else 0
    return half if half and shard // half <= 4 else None


class Terminated(Exception):
    """SIGTERM arrived (a pod preempted or evicted, `kill`): the step in flight finished and the
    checkpoint was saved, so the run resumes from there."""


@contextmanager
def finish_the_step_on_sigterm(trainer: "Trainer"):
    """SIGTERM sets a flag the loop reads after each optimizer step: stopping mid-step could save
    updated weights under the previous step's count, and the resumed run would differ. Kubernetes
    waits terminationGracePeriodSeconds (30 s by default) after SIGTERM, far longer than a step."""
    if threading.current_thread() is not threading.main_thread():  # signals reach only the main thread
        yield
        return

    def request_stop(signum, frame):
        trainer.terminate_requested = True

    previous = signal.signal(signal.SIGTERM, request_stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def sigint_held():
    """Hold SIGINT while Ctrl-C's checkpoint is saved and synced: a terminal's Ctrl-C reaches the
    whole process group, and a second one cut the upload to s3:// short (the run then resumed
    from the checkpoint before). A held SIGINT is delivered when the block ends."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def advice(lr: float, plan: Plan) -> str:
    """What to try after a divergence, in one line."""
    warmup = max(10, plan.max_steps // 20)
    smaller = plan.effective_batch_size // 2
    return (f"try a lower train.lr (e.g. {lr / 4:.3g}), train.warmup_steps={warmup}"
            + (f", or a smaller batch (train.batch_size={smaller})" if smaller >= 1 else ""))


@dataclass
class TrainState:
    """Everything a run needs to continue where it stopped: what a checkpoint holds.

    The model, optimizer, early-stopping and noise-scale objects keep their own state; this
    collects it with the loop's counters, so a checkpoint is `state_dict()` and a resume is
    `load_state_dict()`."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    stopper: early_stopping.EarlyStopping
    noise: Optional[noise_scale.NoiseScaleTracker]
    micro_batch_size: int  # halves on out-of-memory; the effective batch never changes
    step: int = 0
    wall_time_s: float = 0.0  # before this process started
    eval_time_s: float = 0.0  # wall time spent evaluating: a study evaluates often, and that is not training
    best_state: Optional[dict] = None
    target_at: Optional[dict] = None
    oom_events: List[dict] = field(default_factory=list)
    first_loss: Optional[float] = None  # the first step's train loss: the yardstick of loss_exploded
    divergence: Optional[dict] = None
    finished: bool = False
    precision: Optional[Precision] = None  # fp16's gradient scaler keeps state: its scale

    _COUNTERS = ("step", "wall_time_s", "eval_time_s", "best_state", "target_at", "micro_batch_size", "oom_events",
                 "first_loss", "divergence", "finished")

    def state_dict(self) -> dict:
        return {**{k: getattr(self, k) for k in self._COUNTERS},
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "stopper": self.stopper.state_dict(), "rng": [torch.get_rng_state()],  # rank-indexed
                "noise": vars(self.noise) if self.noise is not None else None,
                "precision": self.precision.state_dict() if self.precision is not None else None}

    def load_state_dict(self, state: dict, rank: int = 0) -> None:
        for key in self._COUNTERS:
            setattr(self, key, state[key])
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.stopper.load_state_dict(state["stopper"])
        if rank < len(state["rng"]):  # a rank the writing run did not have seeds itself (Trainer)
            torch.set_rng_state(state["rng"][rank])
        if self.noise is not None and state["noise"] is not None:
            vars(self.noise).update(state["noise"])
        if self.precision is not None:
            self.precision.load_state_dict(state.get("precision"))  # absent: written before train.precision


class Trainer:
    """One run's training: the loop over a TrainState, evaluation, checkpoints and metrics.

    The ranks come from the launcher's environment (distributed.start). Only rank 0 writes
    (metrics.jsonl, checkpoints); every rank trains its shard of each window. With `run_dir`, calling `fit()` again on the same directory resumes from the last
    checkpoint. `progress=None` shows a bar only on a terminal. `on_step(step)` runs after
    every optimizer step, `on_checkpoint()` after every checkpoint is written (the train step
    syncs it to the run's store).
    """

    def __init__(self, model: nn.Module, data: Dataset, cfg: Config, run_dir: Optional[Path] = None,
                 tracker: Optional[tracking.Tracker] = None, progress: Optional[bool] = None,
                 on_step: Optional[Callable[[int], None]] = None,
                 on_checkpoint: Optional[Callable[[], None]] = None):
        if cfg.eval.monitor is None or cfg.data.task is None:  # decided by the data (components.config.for_dataset)
            cfg = parse_config(for_dataset(cfg.to_dict(), data.manifest))
        t, e = cfg.train, cfg.eval
        self.cfg, self.data, self.tracker, self.on_step, self.progress = cfg, data, tracker, on_step, progress
        self.on_checkpoint = on_checkpoint
        self.dist = distributed.start(cfg.world_size, resolve_device(t.device))
        self.device, self.rank = self.dist.device, self.dist.rank
        self.x_train, self.y_train = (torch.as_tensor(a).to(self.device) for a in data.split("train"))
        self.x_val, self.y_val = (torch.as_tensor(a).to(self.device) for a in data.split("val"))
        self.plan = plan = Plan.make(cfg, len(self.x_train))
        self.loss_fn = metrics.loss_fn(data.task)
        self.n_classes = data.manifest["n_classes"] or 0
        self.target_scale = data.manifest.get("target_scale")  # regression: metrics in the target's units
        self.shard = plan.effective_batch_size // plan.world_size  # examples this rank sees per step
        # a measured step without accumulation runs two half-batches: a second forward/backward
        self.noise_every = t.noise_scale_every_steps or (NOISE_EVERY if plan.accumulation_steps > 1
                                                         else NOISE_EVERY_SPLIT)
        model.to(self.device).train()
        self.params = list(model.parameters())
        noise = noise_scale.NoiseScaleTracker(population=plan.n_train) if t.track_noise_scale else None
        self.precision = Precision(t.precision, self.device) if t.precision != "fp32" else None  # None: fp32
        self.state = TrainState(
            model=model, optimizer=make_optimizer(model, t, plan.lr), noise=noise,
            stopper=early_stopping.EarlyStopping(e.mode, e.patience, e.min_delta, e.target, e.divergence_threshold,
                                                 e.stop_at_target),
            micro_batch_size=plan.micro_batch_size, precision=self.precision)
        self.checkpoint_path = Path(run_dir) / CHECKPOINT if run_dir else None
        self.identity = {"config_hash": config_hash(cfg), "data_version": data.data_version}
        self.resumed_from: Optional[int] = None
        self.eval_chunk = 4096  # no activations are kept for backward, so big chunks usually fit; halved if not
        self.loss_since_eval: List[float] = []  # train losses since the last evaluation, for W&B and loss_exploded
        self.train_loss = float("nan")
        self.indices: Optional[torch.Tensor] = None  # the current step's examples
        self.terminate_requested = False  # set by SIGTERM (finish_the_step_on_sigterm)
        self.t0 = time.perf_counter()
        self._resume_or_seed(run_dir)
        self.dist.broadcast_tensors(list(model.state_dict().values()))  # every rank starts from rank 0's weights

    # ------------------------------------------------------------ state

    def _resume_or_seed(self, run_dir: Optional[Path]) -> None:
        ckpt = None
        if self.checkpoint_path is not None and self.checkpoint_path.exists():
            ckpt = storage.load_torch(self.checkpoint_path)
            for key, value in self.identity.items():  # before anything in the directory is touched
                if ckpt[key] != value:
                    raise ConfigError(f"run_id: {self.checkpoint_path.parent.parent} holds a run with a different "
                                      f"{key} ({ckpt[key]} != {value}); choose another run_id")
            if isinstance(ckpt["rng"], torch.Tensor):  # written before checkpoints held one state per rank
                ckpt["rng"] = [ckpt["rng"]]
            written_by, world = len(ckpt["rng"]), self.dist.world_size
            if written_by != world and self.plan.effective_batch_size % world:  # the effective batch cannot be kept
                raise ConfigError(f"resume: the checkpoint was written by {written_by} processes and this run has "
                                  f"{world}; resume with world size {written_by}")
        found = self.dist.gather(ckpt and ckpt["step"])
        if len(set(found)) > 1:  # else the ranks would run different steps and wait on each other forever
            raise ConfigError(f"resume: the ranks found different checkpoints (steps {found}); every rank must "
                              f"read the same {CHECKPOINT}")
        self.log = storage.JsonlWriter(Path(run_dir) / METRICS) if run_dir and self.rank == 0 else None
        if ckpt is None:
            torch.manual_seed(self.cfg.train.seed + self.rank)  # dropout draws, their own per rank
            return
        self.state.load_state_dict(ckpt, self.rank)
        self.resumed_from = self.state.step
        if self.log:
            self.log.truncate(ckpt["metrics_offset"])  # rows after the checkpoint are written again
        if len(ckpt["rng"]) != self.dist.world_size:
            self._regroup(len(ckpt["rng"]))

    def _regroup(self, written_by: int) -> None:
        """Resumed with another world size and the same effective batch. Every window is still cut
        into one shard per rank in rank order, so each step trains on the same examples and every
        epoch on each example once; the micro-batch stays the checkpoint's when it divides the new
        shard (else the largest that does), the accumulation makes up the rest. A rank the writing
        run did not have starts a random stream (dropout) of its own."""
        s = self.state
        s.micro_batch_size = largest_divisor_at_most(self.shard, s.micro_batch_size)
        if self.rank >= written_by:
            torch.manual_seed(self.cfg.train.seed + self.rank + 1_000_003 * s.step)
        if self.log:
            self.log.write(self.row({"event": "world_size_changed", "from": written_by, "to": self.dist.world_size,
                                     "micro_batch_size": s.micro_batch_size,
                                     "accumulation_steps": self.shard // s.micro_batch_size}))

    def save_checkpoint(self) -> None:
        if self.checkpoint_path is None:
            return
        rng = self.dist.gather(torch.get_rng_state())  # a collective: every rank saves at the same steps
        if self.dist.is_main:
            self.state.wall_time_s, before = self.elapsed(), self.state.wall_time_s
            try:
                storage.save_torch({**self.identity, **self.state.state_dict(), "rng": rng,
                                    "metrics_offset": self.log.offset() if self.log else 0}, self.checkpoint_path)
            finally:
                self.state.wall_time_s = before  # elapsed() adds this process's time to it
            if self.on_checkpoint:
                self.on_checkpoint()
        self.dist.barrier()  # no rank goes on (to a resume, say) before the checkpoint is there

    def elapsed(self) -> float:
        return self.state.wall_time_s + time.perf_counter() - self.t0

    def row(self, extra: dict) -> dict:
        step, plan = self.state.step, self.plan
        return {"step": step, "samples_seen": step * plan.effective_batch_size,
                "epoch": step / plan.steps_per_epoch, "wall_time_s": round(self.elapsed(), 6), **extra}

    # ------------------------------------------------------------ one step, one evaluation

    def micro_steps(self, m: int) -> List[torch.Tensor]:
        """One optimizer step's forward/backward at micro-batch m over the current indices."""
        s = self.state
        measure_at = None
        if s.noise is not None and s.step % self.noise_every == 0:
            measure_at = measuring_micro(self.shard, m)
        if self.dist.distributed:
            return self.micro_steps_across_ranks(measure_at or m, measure_at is not None)
        if measure_at is not None:
            return accumulate_gradients(s.model, self.loss_fn, self.x_train, self.y_train, self.indices,
                                        measure_at, s.noise, self.precision)
        return accumulate_gradients(s.model, self.loss_fn, self.x_train, self.y_train, self.indices, m,
                                    precision=self.precision)

    def micro_steps_across_ranks(self, m: int, measure: bool) -> List[torch.Tensor]:
        """This rank's micro-steps, then one all-reduce agreeing on out-of-memory (dist.agreed_step).
        Noise scale: each rank's first micro-batch gradient (before the all-reduce, averaged over
        ranks) is the small batch, the whole effective batch (after it) the big one; both drawn
        without replacement from the epoch's permutation, so the estimate stays unbiased."""
        s, count = self.state, self.shard // m

        def local():
            losses, first_norms = backward_micro_batches(s.model, self.loss_fn, self.x_train, self.y_train,
                                                         self.indices, m, measure, self.precision)
            micro_sq = torch.stack(first_norms).square().sum() * count ** 2 if measure else torch.zeros(())
            return torch.stack(losses).detach().mean(), micro_sq

        loss, micro_sq = self.dist.agreed_step(self.params, local, f"micro-batch {m}")
        if measure:
            big_sq, = noise_scale.squared_totals(noise_scale.grad_norms(self.params))
            feed_noise(s.noise, self.precision, micro_sq, big_sq, m, self.plan.effective_batch_size)
        return [torch.tensor(loss)]

    def smaller_micro(self, m: int) -> int:
        return largest_divisor_at_most(self.shard, m // 2)

    def on_oom(self, old: int, new: int) -> None:
        # Out of memory (variable inputs, fragmentation): redo this step with a smaller
        # micro-batch and more accumulation: the same update, the same effective batch.
        self.state.optimizer.zero_grad(set_to_none=True)
        self.state.oom_events.append({"step": self.state.step + 1, "from": old, "to": new})
        if self.log:
            self.log.write(self.row({"event": "out_of_memory", "micro_batch_size": new,
                                     "accumulation_steps": self.shard // new}))

    def validation_metrics(self) -> dict:
        """Rank 0 evaluates the whole validation split and every rank gets its numbers: the
        stopping rules then see the same values and take the same decisions on every rank."""
        if self.dist.distributed:
            self.dist.broadcast_tensors(list(self.state.model.buffers()))  # e.g. batch-norm statistics
            return self.dist.broadcast(self.own_validation_metrics() if self.dist.is_main else None)
        return self.own_validation_metrics()

    def own_validation_metrics(self) -> dict:
        values, self.eval_chunk = memory.halving_on_oom(
            lambda chunk: metrics.evaluate(self.state.model, self.x_val, self.y_val, self.data.task, self.n_classes,
                                           chunk=chunk, target_scale=self.target_scale), self.eval_chunk)
        return values

    def evaluate(self, bar) -> None:
        s, e = self.state, self.cfg.eval
        started = time.perf_counter()
        values = self.validation_metrics()
        if s.noise is not None and s.noise.value is not None:
            values["gns/b_simple"] = s.noise.value
        had_target = s.stopper.target_step is not None
        if self.loss_since_eval and s.first_loss is not None:
            s.stopper.train_loss(sum(self.loss_since_eval) / len(self.loss_since_eval), s.first_loss, s.step)
        # NaN weights can still give a finite accuracy (argmax of NaN logits): the loss tells
        monitored = values[e.monitor] if math.isfinite(values["val/loss"]) else values["val/loss"]
        if not s.stopper.diverged and s.stopper.update(monitored, s.step, e.monitor):
            s.best_state = {k: v.detach().clone() for k, v in s.model.state_dict().items()}
        if not had_target and s.stopper.target_step is not None:
            now = self.elapsed()
            s.target_at = {"steps": s.step, "samples": s.step * self.plan.effective_batch_size, "time_s": now,
                           "train_time_s": now - s.eval_time_s - (time.perf_counter() - started)}
        out = self.row(values)
        if self.log:
            self.log.write(out)
        if self.tracker:  # one W&B call per evaluation, carrying the train loss since the last one
            self.tracker.log(tracking.eval_row(out, self.loss_since_eval, s.optimizer.param_groups[0]["lr"]))
        self.loss_since_eval.clear()
        if not bar.disable:
            bar.set_postfix({"train/loss": f"{self.train_loss:.4f}", e.monitor: f"{values[e.monitor]:.4f}"},
                            refresh=False)
        s.eval_time_s += time.perf_counter() - started

    # ------------------------------------------------------------ the loop

    def fit(self) -> RunRecord:
        """Train the model in place and leave the best weights (by `eval.monitor`) loaded in it."""
        from tqdm.auto import tqdm

        s, plan = self.state, self.plan
        bar = tqdm(total=plan.max_steps, initial=s.step, unit="step", desc="train",
                   disable=(None if self.progress is None else not self.progress) if self.dist.is_main else True)
        self.t0 = time.perf_counter()
        try:
            with finish_the_step_on_sigterm(self):
                if s.step == 0 and s.stopper.first is None:  # where it started: what a collapse falls back to
                    s.stopper.start(self.validation_metrics()[self.cfg.eval.monitor])
                    self.t0 = time.perf_counter()  # not training time
                if not s.finished:
                    self._loop(bar)
                    self._finish(bar)
        except KeyboardInterrupt:
            if not self.dist.distributed:  # across ranks Ctrl-C lands mid-collective on some: SIGTERM saves
                with sigint_held():
                    self.save_checkpoint()  # Ctrl-C: the run resumes from here
            raise
        finally:
            bar.close()
            if self.log:
                self.log.close()
        if s.best_state is not None:
            s.model.load_state_dict(s.best_state)
        return self.result()

    def _loop(self, bar) -> None:
        s, plan, t, log = self.state, self.plan, self.cfg.train, self.log
        stopper, optimizer, shard, rank, precision = s.stopper, s.optimizer, self.shard, self.rank, self.precision
        last_flush = last_checkpoint = time.perf_counter()
        last_eval_step = s.step
        while not stopper.should_stop and s.step < plan.max_steps:
            epoch, first_window = divmod(s.step, plan.steps_per_epoch)
            order = epoch_order(t.seed, epoch, plan.n_train).to(self.device)
            for window in range(first_window, plan.steps_per_epoch):
                start = window * plan.effective_batch_size + rank * shard
                self.indices = order[start:start + shard]
                lr = lr_at(s.step, plan.lr, t, plan.max_steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr

                losses, s.micro_batch_size = memory.halving_on_oom(self.micro_steps, s.micro_batch_size,
                                                                   self.smaller_micro, self.on_oom)
                if precision is None:
                    optimizer.step()
                    stepped = True
                else:
                    stepped = precision.step(optimizer)  # fp16: False when the scaler skipped it
                optimizer.zero_grad(set_to_none=True)
                s.step += 1
                step = s.step
                if not stepped and log:
                    log.write(self.row({"event": "skipped_step", "loss_scale": precision.scale}))

                # The mean micro-batch loss, read one by one: on CPU cheaper than stacking them (two more
                # ops a step cost 2.7% of the loop at 32 x 4); on a GPU the first .item() waits for the
                # step and the others copy one number each.
                self.train_loss = train_loss = sum([loss.item() for loss in losses]) / len(losses)
                self.loss_since_eval.append(train_loss)
                if s.first_loss is None:
                    s.first_loss = train_loss
                finite = math.isfinite(train_loss)
                # a dict only for W&B following live or a non-finite loss; otherwise the fast row
                out = self.row({"train/loss": train_loss, "lr": lr}) if self.tracker or not finite else None
                if log and out is None:
                    log.write_later(STEP_ROW, (step, step * plan.effective_batch_size, step / plan.steps_per_epoch,
                                               self.elapsed(), train_loss, lr))
                elif log:
                    log.write(out)
                if self.tracker:
                    self.tracker.log_train(out)
                bar.update()
                if self.on_step:
                    self.on_step(step)
                if not finite:
                    stopper.non_finite_loss(train_loss, step)
                    break
                if step % plan.eval_every_steps == 0 or step == plan.max_steps:
                    self.evaluate(bar)
                    last_eval_step = step
                now = time.perf_counter()
                due = bool((t.checkpoint_every_steps and step % t.checkpoint_every_steps == 0)
                           or (t.checkpoint_every_s and now - last_checkpoint >= t.checkpoint_every_s))
                stop = self.terminate_requested
                if self.dist.distributed:  # each rank's clock and signals: agreed, or the ranks part ways
                    # (a SIGTERM landing during this collective stays set, for the next step's agreement)
                    due, stop = self.dist.any(due, stop)
                if due:
                    self.save_checkpoint()
                    last_checkpoint = now
                if stopper.should_stop or step >= plan.max_steps:
                    break
                if stop:
                    self.save_checkpoint()
                    raise Terminated(f"SIGTERM: stopped after step {step} with a checkpoint; the run resumes from it")
                if log and now - last_flush > 0.5:  # keeps progress readers current
                    log.flush()
                    last_flush = now
        if last_eval_step != s.step and stopper.stop_reason != early_stopping.NON_FINITE:
            self.evaluate(bar)  # the last steps count toward the best weights too

    def _finish(self, bar) -> None:
        s = self.state
        if s.stopper.diverged:
            lr = s.optimizer.param_groups[0]["lr"]
            s.divergence = {"rule": s.stopper.divergence_rule, "detail": s.stopper.divergence_detail,
                            "step": s.step, "lr": lr, "advice": advice(lr, self.plan)}
        bar.set_description_str(f"train ({self.stop_reason()})")
        s.finished = True
        self.save_checkpoint()

    def stop_reason(self) -> str:
        return self.state.stopper.stop_reason or self.plan.limit

    def result(self) -> RunRecord:
        """The run's record as far as training knows it (evaluate adds the test metrics)."""
        s, plan, target_at, cfg = self.state, self.plan, self.state.target_at, self.cfg
        best = s.best_state is not None
        return RunRecord(
            run_id=cfg.run_id, status="diverged" if s.divergence else "completed", stop_reason=self.stop_reason(),
            divergence=s.divergence, task=self.data.task, effective_batch_size=plan.effective_batch_size,
            micro_batch_size=s.micro_batch_size, accumulation_steps=self.shard // s.micro_batch_size,
            world_size=plan.world_size, lr=plan.lr, optimizer=cfg.train.optimizer, optimizer_steps=s.step,
            epochs=s.step / plan.steps_per_epoch, samples_seen=s.step * plan.effective_batch_size,
            steps_per_epoch=plan.steps_per_epoch, max_steps=plan.max_steps, wall_time_s=self.elapsed(),
            eval_time_s=s.eval_time_s,
            best_metric={"name": cfg.eval.monitor, "value": s.stopper.best if best else None,
                         "step": s.stopper.best_step if best else None},
            target=cfg.eval.target, steps_to_target=target_at["steps"] if target_at else None,
            samples_to_target=target_at["samples"] if target_at else None,
            time_to_target_s=target_at["time_s"] if target_at else None,
            train_time_to_target_s=target_at["train_time_s"] if target_at else None,
            resumed_from_step=self.resumed_from, data_version=self.identity["data_version"],
            config_hash=self.identity["config_hash"], counts=self.data.manifest["counts"], oom_events=s.oom_events,
            gns_b_simple=s.noise.value if s.noise is not None else None)

def fit(model: nn.Module, data: Dataset, cfg: Config, run_dir: Optional[Path] = None,
        tracker: Optional[tracking.Tracker] = None, progress: Optional[bool] = None,
        on_step: Optional[Callable[[int], None]] = None) -> RunRecord:
    """Train `model` in place and leave the best weights (by `eval.monitor`) loaded in it:
    `Trainer(...).fit()`. See Trainer for the arguments."""
    return Trainer(model, data, cfg, run_dir, tracker, progress, on_step).fit()
