"""Data-parallel training across processes, as torchrun (or a Kubeflow TrainJob) starts them.

The launcher sets RANK, WORLD_SIZE and LOCAL_RANK (and MASTER_ADDR/PORT for the rendezvous);
`start` reads them, checks the world size against the config and joins the process group: gloo
on CPU, NCCL on CUDA. With one process every helper returns its input: a single-process run does
exactly what it did before, with no process group.

The helpers are collectives: every rank must call them in the same order, or the ranks wait
on each other forever. The training loop therefore takes every decision that could differ
between ranks (an out-of-memory error, a clock, a signal) through one of them.
"""

import os
import traceback
from dataclasses import dataclass
from typing import Any, Callable, List, Sequence, Tuple

import torch
import torch.distributed as dist

from components.errors import ConfigError
from components.memory import is_oom


@dataclass(frozen=True)
class Runtime:
    """This process's place among the ranks."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes metrics, checkpoints and W&B."""
        return self.rank == 0

    def any(self, *flags: bool) -> Tuple[bool, ...]:
        """Each flag, true when it is true on any rank."""
        if not self.distributed:
            return flags
        t = torch.tensor([float(f) for f in flags], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return tuple(bool(v) for v in t.tolist())

    def mean(self, value: float) -> float:
        if not self.distributed:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.item() / self.world_size

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` (a small picklable decision or dict of metrics) on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> List[Any]:
        """[rank 0's obj, rank 1's, ...] on every rank (a checkpoint's per-rank RNG states)."""
        if not self.distributed:
            return [obj]
        out: List[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def broadcast_tensors(self, tensors: Sequence[torch.Tensor]) -> None:
        """Overwrite each tensor with rank 0's (the weights every rank starts from)."""
        if self.distributed:
            for t in tensors:
                dist.broadcast(t.data, src=0)

    def agreed_step(self, params: Sequence[torch.nn.Parameter], local: Callable[[], Tuple[torch.Tensor, torch.Tensor]],
                    what: str) -> Tuple[float, float]:
        """`local()` (this rank's micro-steps, returning two scalars: its loss and one more), then
        the step's one all-reduce: the mean gradient, the mean of each scalar, and how many ranks
        ran out of memory. If any did, every rank raises it (so all of them back off together);
        a rank that ran out still takes part in the all-reduce, so none is left waiting."""
        try:
            loss, other = local()
            oom = 0.0
        except Exception as exc:  # noqa: BLE001 - only out-of-memory is handled
            if not is_oom(exc):
                raise
            traceback.clear_frames(exc.__traceback__)  # its frames hold the failed attempt's tensors
            loss, other, oom = torch.zeros(()), torch.zeros(()), 1.0
        extras = torch.stack([loss.to(self.device), other.to(self.device), torch.tensor(oom, device=self.device)])
        loss_sum, other_sum, ooms = self.reduce_gradients(params, extras).tolist()
        if ooms:
            raise torch.OutOfMemoryError(f"out of memory on {ooms:.0f} of {self.world_size} ranks at {what}")
        return loss_sum / self.world_size, other_sum / self.world_size

    def reduce_gradients(self, params: Sequence[torch.nn.Parameter], extras: torch.Tensor) -> torch.Tensor:
        """Average every parameter's .grad over the ranks and sum `extras` (a few per-step numbers:
        flags, a loss) in the same all-reduce, so a step costs one collective; returns the summed
        extras. A rank whose step failed still takes part, with zeros for gradients it lacks."""
        if not self.distributed:
            return extras
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads] + [extras.to(grads[0].dtype)])
        dist.all_reduce(flat)
        offset = 0
        for p, g in zip(params, grads):
            if p.grad is not None:
                p.grad.copy_(flat[offset:offset + g.numel()].view_as(g)).div_(self.world_size)
            offset += g.numel()
        return flat[offset:]


STEP_EXTRAS = 3  # what agreed_step packs after the gradients: the loss, one more scalar, the out-of-memory flag


def flat_buffer_bytes(params: Sequence[torch.nn.Parameter], world_size: int) -> int:
    """Bytes of the flat buffer each rank's step allocates for its all-reduce (reduce_gradients:
    every gradient and agreed_step's STEP_EXTRAS in one tensor of the gradients' dtype, while the
    gradients are held too); 0 with one process, which never reduces. The probe's memory fit
    counts it (components/probe.py)."""
    if world_size <= 1:
        return 0
    params = list(params)
    element = params[0].element_size() if params else 4
    return (sum(p.numel() for p in params) + STEP_EXTRAS) * element


def runtime_from_env(environ=os.environ) -> Tuple[int, int, int]:
    """(rank, world_size, local_rank) as torchrun sets them; (0, 1, 0) outside a launcher."""
    return (int(environ.get("RANK", 0)), int(environ.get("WORLD_SIZE", 1)), int(environ.get("LOCAL_RANK", 0)))


def start(configured_world_size: int, device: torch.device, environ=os.environ) -> Runtime:
    """This process's Runtime; joins the process group when there is more than one rank. The
    launcher's world size must be the config's: the effective batch is divided by it."""
    rank, world_size, local_rank = runtime_from_env(environ)
    if world_size != configured_world_size:
        raise ConfigError(f"world size: the launcher started {world_size} processes (WORLD_SIZE={world_size}) but "
                          f"the config's world size is {configured_world_size}; launch as many as the config says")
    if world_size == 1:
        return Runtime(device=device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world_size)
    return Runtime(rank, world_size, local_rank, device)


def shutdown() -> None:
    """Leave the process group (the end of a launched process's work)."""
    if dist.is_initialized():
        dist.destroy_process_group()
