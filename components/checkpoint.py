"""What a checkpoint holds and how a run continues from one: the TrainState, its save and restore,
and the regroup when the run resumes with another world size.

A checkpoint is `TrainState.state_dict()` with the run's identity (config hash and data version:
a directory holding another run is refused before anything in it is touched), one RNG state per
rank, and how far metrics.jsonl had got (the rows after it are written again on resume). Only
rank 0 writes it (components/training.py); every rank reads the same file.

Another world size resumes when the effective batch can be kept (`regroup`): the windows are the
same, so is each step's data, and the accumulation makes up the difference; else a clear error.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import torch
from torch import nn

from components import early_stopping, noise_scale, storage
from components.config import largest_divisor_at_most
from components.distributed import Runtime
from components.errors import ConfigError
from components.precision import Precision

CHECKPOINT = "checkpoints/last.pt"


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

    def keep_best(self) -> None:
        """The model's weights as the best so far: copied into the buffers of the previous best in
        one foreach copy (cloning each tensor at every improvement cost ~4x as much on a small model)."""
        weights = self.model.state_dict()  # detached tensors
        if self.best_state is None:
            self.best_state = {k: v.clone() for k, v in weights.items()}
        else:
            torch._foreach_copy_(list(self.best_state.values()), list(weights.values()))

    def state_dict(self) -> dict:
        """A finished run does not continue: its checkpoint keeps what it produced (best_state) and
        not the last weights or the optimizer's state (up to 3x the model's size with AdamW)."""
        return {**{k: getattr(self, k) for k in self._COUNTERS},
                "model": None if self.finished else self.model.state_dict(),
                "optimizer": None if self.finished else self.optimizer.state_dict(),
                "stopper": self.stopper.state_dict(), "rng": [torch.get_rng_state()],  # rank-indexed
                "noise": vars(self.noise) if self.noise is not None else None,
                "precision": self.precision.state_dict() if self.precision is not None else None}

    def load_state_dict(self, state: dict, rank: int = 0) -> None:
        for key in self._COUNTERS:
            setattr(self, key, state[key])
        if state["model"] is not None:  # None: a finished run's (state_dict)
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        self.stopper.load_state_dict(state["stopper"])
        if rank < len(state["rng"]):  # a rank the writing run did not have seeds itself (Trainer)
            torch.set_rng_state(state["rng"][rank])
        if self.noise is not None and state["noise"] is not None:
            vars(self.noise).update(state["noise"])
        if self.precision is not None:
            self.precision.load_state_dict(state.get("precision"))  # absent: written before train.precision


def read(path: Optional[Path], identity: dict, world_size: int, effective_batch: int) -> Optional[dict]:
    """The checkpoint at `path` (None when there is none), checked against this run: the same
    identity, and a world size that keeps the effective batch. One RNG state per rank, also for
    a checkpoint written before it held one per rank."""
    if path is None or not path.exists():
        return None
    ckpt = storage.load_torch(path)
    for key, value in identity.items():  # before anything in the directory is touched
        if ckpt[key] != value:
            raise ConfigError(f"run_id: {path.parent.parent} holds a run with a different "
                              f"{key} ({ckpt[key]} != {value}); choose another run_id")
    if isinstance(ckpt["rng"], torch.Tensor):  # written before checkpoints held one state per rank
        ckpt["rng"] = [ckpt["rng"]]
    written_by = len(ckpt["rng"])
    if written_by != world_size and effective_batch % world_size:  # the effective batch cannot be kept
        raise ConfigError(f"resume: the checkpoint was written by {written_by} processes and this run has "
                          f"{world_size}; resume with world size {written_by}")
    return ckpt


def agree(dist: Runtime, ckpt: Optional[dict]) -> None:
    """Every rank found the same checkpoint (a collective)."""
    found = dist.gather(ckpt and ckpt["step"])
    if len(set(found)) > 1:  # else the ranks would run different steps and wait on each other forever
        raise ConfigError(f"resume: the ranks found different checkpoints (steps {found}); every rank must "
                          f"read the same {CHECKPOINT}")


def regroup(state: TrainState, shard: int, rank: int, seed: int, written_by: int) -> None:
    """Resumed with another world size and the same effective batch. Every window is still cut
    into one shard per rank in rank order, so each step trains on the same examples and every
    epoch on each example once; the micro-batch stays the checkpoint's when it divides the new
    shard (else the largest that does), the accumulation makes up the rest. A rank the writing
    run did not have starts a random stream (dropout) of its own."""
    state.micro_batch_size = largest_divisor_at_most(shard, state.micro_batch_size)
    if rank >= written_by:
        torch.manual_seed(seed + rank + 1_000_003 * state.step)


def write(path: Path, state: TrainState, identity: dict, rng: List[torch.Tensor], metrics_offset: int,
          wall_time_s: float) -> None:
    """Rank 0's checkpoint: the state as of `wall_time_s` (this process's time included), every
    rank's RNG state (gathered by the caller, a collective) and metrics.jsonl's length."""
    state.wall_time_s, before = wall_time_s, state.wall_time_s
    try:
        storage.save_torch({**identity, **state.state_dict(), "rng": rng, "metrics_offset": metrics_offset}, path)
    finally:
        state.wall_time_s = before  # the trainer's clock adds this process's time to it
