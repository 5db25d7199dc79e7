"""One optimizer step's forward/backward on one process: micro-batches whose gradients accumulate
into .grad, in the run's precision, with the gradient norms the noise-scale estimate needs.

Words (see GUIDE.md): a micro-batch is what one forward/backward sees; `accumulation_steps`
micro-batches are summed into one optimizer step (iteration). Dividing each micro-batch's mean
loss by their count makes the sum the whole batch's mean gradient: accumulation is exact.

Precision (train.precision, components/precision.py): forward and loss under autocast; with fp16
the scaled loss is backpropagated; noise-scale norms are unscaled first (feed_noise).

These are the training loop's hot path (bench/train_loop_overhead.py times the loop against a
hand-written one): plain loops, no per-micro-batch wrapper calls for fp32. Across ranks the same
micro-steps run before the step's one all-reduce (components/distributed_step.py).
"""

import math
from typing import List, Optional, Sequence

import torch
from torch import nn

from components import noise_scale
from components.config import largest_divisor_at_most
from components.precision import Precision

NOISE_EVERY, NOISE_EVERY_SPLIT = 4, 16  # default noise-measuring interval (train.noise_scale_every_steps)


def accumulate_gradients(model: nn.Module, loss_fn, x: torch.Tensor, y: torch.Tensor, indices: torch.Tensor,
                         micro: int, noise: Optional[noise_scale.NoiseScaleTracker] = None,
                         precision: Optional[Precision] = None,
                         params: Optional[Sequence[nn.Parameter]] = None) -> List[torch.Tensor]:
    """Forward/backward over `indices` in micro-batches of `micro`, summing into .grad.

    Micro-batches are equal-sized (`micro` divides len(indices)), so dividing each mean loss by
    their count makes the summed gradient the mean over all of `indices`: the same update as
    one forward/backward over the whole batch. With `noise`, the gradient norm after the first
    micro-batch (count^2 x |.grad|^2 is that micro-batch's own |g|^2) and after the last (the
    whole batch's) feed the noise-scale estimate: two norms per step, no copies. `precision`:
    autocast and (fp16) loss scaling (components/precision.py); None: fp32. `params`: the model's
    parameters as a list, for the norms (the trainer's: walking model.parameters() twice a
    measured step showed in the loop); None: model.parameters().
    """
    if noise is not None and params is None:
        params = list(model.parameters())
    losses, first_norms = backward_micro_batches(model, loss_fn, x, y, indices, micro, noise is not None, precision,
                                                 params)
    if noise is not None:
        count = indices.shape[0] // micro
        first_sq, big_sq = noise_scale.squared_totals(first_norms, noise_scale.grad_norms(params))
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
                           micro: int, measure: bool = False, precision: Optional[Precision] = None,
                           params: Optional[Sequence[nn.Parameter]] = None):
    """accumulate_gradients' micro-steps: (the micro-batch losses, and with `measure` the
    per-tensor gradient norms of `params` (None: model.parameters()) after the first micro-batch).
    Forward and loss under the precision's autocast; backward of the (fp16: scaled) loss outside
    it, as torch advises."""
    n = indices.shape[0]
    count = n // micro
    losses, first_norms = [], None
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
            first_norms = noise_scale.grad_norms(model.parameters() if params is None else params)
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
