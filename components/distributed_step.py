"""One optimizer step's micro-steps across ranks (torchrun; components/distributed.py): this rank's
share of the step accumulated locally, then the step's one all-reduce.

Each window of the effective batch is cut into `world_size` shards and a rank trains on shard
`rank` (components/training.py); with one process that is the whole window. Every micro-step
accumulates locally (components/accumulation.py); then one all-reduce per step averages the
gradients and carries the step's loss and an out-of-memory flag (Runtime.agreed_step). The flag
is why this is not DistributedDataParallel: DDP reduces inside the last micro-step's backward, so
a rank that runs out of memory before it leaves the others waiting in that all-reduce (the
deadlock Composer had); here every rank reaches the one collective, and if any ran out of memory
all of them halve the micro-batch and redo the step.

What the step holds beyond one process's (the probe's memory fit counts it): the all-reduce's
flat buffer, every gradient and the extras packed into one tensor (distributed.flat_buffer_bytes).

The trainer and the probe's scaling burst (components/scaling.py) both step through here, so the
probe times the step training runs.
"""

from typing import List, Optional, Sequence

import torch
from torch import nn

from components import noise_scale
from components.accumulation import backward_micro_batches, feed_noise
from components.distributed import Runtime
from components.precision import Precision


def micro_steps_across_ranks(dist: Runtime, params: Sequence[nn.Parameter], model: nn.Module, loss_fn,
                             x: torch.Tensor, y: torch.Tensor, indices: torch.Tensor, m: int,
                             precision: Optional[Precision] = None,
                             noise: Optional[noise_scale.NoiseScaleTracker] = None,
                             batch: int = 0) -> List[torch.Tensor]:
    """This rank's micro-steps over `indices` at micro-batch `m`, then one all-reduce agreeing on
    out-of-memory (dist.agreed_step); returns [the step's mean loss over the ranks].

    With `noise` (a measuring step; `batch` is the effective batch): each rank's first micro-batch
    gradient (before the all-reduce, averaged over ranks) is the small batch, the whole effective
    batch (after it) the big one; both drawn without replacement from the epoch's permutation, so
    the estimate stays unbiased."""
    measure = noise is not None
    count = indices.shape[0] // m

    def local():
        losses, first_norms = backward_micro_batches(model, loss_fn, x, y, indices, m, measure, precision, params)
        micro_sq = torch.stack(first_norms).square().sum() * count ** 2 if measure else torch.zeros(())
        return torch.stack(losses).detach().mean(), micro_sq

    loss, micro_sq = dist.agreed_step(params, local, f"micro-batch {m}")
    if measure:
        big_sq, = noise_scale.squared_totals(noise_scale.grad_norms(params))
        feed_noise(noise, precision, micro_sq, big_sq, m, batch)
    return [torch.tensor(loss)]

