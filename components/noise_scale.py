"""The gradient noise scale B_simple = tr(Sigma) / |G|^2 (see GUIDE.md, section 6).

What it tells a user: below about B_simple examples per step, doubling the batch about
halves the steps needed (the extra examples mostly average away gradient noise); well above
it, doubling the batch hardly reduces the steps and just costs twice the compute. It is an
estimate of the critical batch size and it usually grows as training goes on.

G is the full-data mean gradient and Sigma the covariance of per-example gradients.
Both come from McCandlish et al. 2018, "An Empirical Model of Large-Batch Training"
(arXiv:1812.06162), Appendix A: squared norms of mean gradients at two batch sizes give
unbiased estimates of |G|^2 and tr(Sigma); averaged over many batches, their ratio is
B_simple.

Finite population: a batch of B drawn without replacement from N examples has a mean
whose covariance is Sigma/B x (N-B)/(N-1), not Sigma/B (Sigma with the population
definition, 1/N). So for a batch mean G_B:
    E|G_B|^2 = |G|^2 + tr(Sigma) c(B),  c(B) = (1/B)(N-B)/(N-1)  (c(B) = 1/B with replacement).
Two batch sizes, two equations; solved for the unknowns:
    tr(Sigma) = (E|G_s|^2 - E|G_b|^2) / (c_s - c_b)
    |G|^2     = (c_s E|G_b|^2 - c_b E|G_s|^2) / (c_s - c_b)
With c = 1/B these are the paper's formulas. Ignoring the correction is not a small-batch
detail: since c(B) = (N/(N-1))/B - 1/(N-1), the uncorrected |G|^2 comes out low by
tr(Sigma)/(N-1) whatever the two batch sizes, so the uncorrected B_simple is about
B / (1 - B/N): twice too high once B_simple reaches N/2, which happens late in training
on small datasets.
"""

import math
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, List, Optional, Tuple

import torch
from torch import nn


@dataclass
class NoiseScale:
    b_simple: float  # tr(Sigma) / |G|^2; nan when |G|^2 is not resolved above the noise
    grad_sq: float  # |G|^2 estimate
    trace: float  # tr(Sigma) estimate
    spread: float  # standard error of b_simple (delta method over the batches)
    n_batches: int
    small_batch: int
    big_batch: int

    def to_dict(self) -> dict:
        return asdict(self)


def inverse_batch(batch: int, population: Optional[int] = None) -> float:
    """c(B): the variance of a batch mean in units of tr(Sigma). Without a population,
    batches are taken as drawn with replacement (or from an endless stream)."""
    if population is None:
        return 1.0 / batch
    return (population - batch) / (batch * (population - 1))


def unbiased_estimates(small_sq: float, big_sq: float, b_small: int, b_big: int,
                       population: Optional[int] = None) -> Tuple[float, float]:
    """(|G|^2, tr Sigma) from one pair of squared mean-gradient norms at two batch sizes (floats,
    or tensors of many pairs). Each is unbiased but very noisy alone: average many before
    taking a ratio."""
    c_small, c_big = inverse_batch(b_small, population), inverse_batch(b_big, population)
    grad_sq = (c_small * big_sq - c_big * small_sq) / (c_small - c_big)
    trace = (small_sq - big_sq) / (c_small - c_big)
    return grad_sq, trace


def estimate(small_sq: torch.Tensor, big_sq: torch.Tensor, small_batch: int, big_batch: int,
             population: Optional[int] = None) -> NoiseScale:
    """B_simple as a ratio of means over batches (as in the paper), from per-batch squared
    norms: `small_sq[i]` a micro-batch gradient's (or the mean over a batch's micro-batches),
    `big_sq[i]` the big-batch gradient's."""
    grad_sq, trace = unbiased_estimates(small_sq.double(), big_sq.double(), small_batch, big_batch, population)
    n = len(grad_sq)
    mean_g, mean_t = grad_sq.mean().item(), trace.mean().item()
    if mean_g <= 0:  # the noise swamps |G|^2 at this many batches: no ratio to report
        ratio, spread = math.nan, math.nan
    else:
        ratio = mean_t / mean_g
        # delta method for a ratio of means: Var(t/g) ~ Var(t - R g) / (n mean_g^2)
        residual = trace - ratio * grad_sq
        spread = (residual.var() / n).sqrt().item() / mean_g if n > 1 else math.nan
    return NoiseScale(b_simple=ratio, grad_sq=mean_g, trace=mean_t, spread=spread,
                      n_batches=n, small_batch=small_batch, big_batch=big_batch)


def flat_grad(loss: torch.Tensor, params: List[nn.Parameter]) -> torch.Tensor:
    # autograd.grad returns the gradients without touching .grad, so the caller's grads survive
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    # a sparse gradient (nn.Embedding(sparse=True)) has no reshape: its dense form has the same norm
    return torch.cat([(torch.zeros_like(p) if g is None else g.to_dense() if g.is_sparse else g).reshape(-1)
                      for g, p in zip(grads, params)])


def batch_sq_norms(model: nn.Module, loss_fn: Callable, x: torch.Tensor, y: torch.Tensor, small_batch: int,
                   accumulation: int, n_batches: int, generator: torch.Generator,
                   with_replacement: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per big batch: the mean of its micro-batch gradients' squared norms, and the squared norm
    of their mean (the big-batch gradient, as gradient accumulation builds it).

    Train mode, like the steps being measured: with dropout, its noise is part of the gradient
    noise the optimizer sees, and it is independent per example, so it scales as 1/B like the
    rest. The global RNG is forked so that measuring leaves a training run's random stream alone.
    """
    big_batch, n = small_batch * accumulation, len(x)
    if accumulation < 2:
        raise ValueError(f"noise scale: accumulation must be at least 2 (two batch sizes), got {accumulation}")
    if not with_replacement and big_batch > n:
        raise ValueError(f"noise scale: big batch {big_batch} ({small_batch} x {accumulation}) is larger than "
                         f"the {n} examples it is drawn from without replacement")
    params = [p for p in model.parameters() if p.requires_grad]
    was_training = model.training
    cuda = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    small_sq, big_sq = [], []
    try:
        with torch.random.fork_rng(devices=cuda):
            model.train()
            for _ in range(n_batches):
                if with_replacement:
                    idx = torch.randint(n, (big_batch,), generator=generator)
                else:
                    idx = torch.randperm(n, generator=generator)[:big_batch]
                micro_sq, total = 0.0, None
                for mb in idx.to(x.device).split(small_batch):
                    g = flat_grad(loss_fn(model(x[mb]), y[mb]), params)
                    # squared norms are differenced by the estimator: sum them in double
                    micro_sq = micro_sq + g.pow(2).sum(dtype=torch.float64)
                    total = g if total is None else total + g
                small_sq.append(micro_sq / accumulation)
                big_sq.append((total / accumulation).pow(2).sum(dtype=torch.float64))
    finally:
        model.train(was_training)
    return torch.stack(small_sq).cpu(), torch.stack(big_sq).cpu()


def measure(model: nn.Module, loss_fn: Callable, x: torch.Tensor, y: torch.Tensor, small_batch: int,
            accumulation: int, n_batches: int, generator: torch.Generator,
            with_replacement: bool = False) -> NoiseScale:
    """B_simple of `model` on (x, y) from `n_batches` big batches of small_batch x accumulation
    examples. Leaves the parameters and their .grad as they were.

    Without replacement (the default, as training draws its batches) the finite-population
    correction uses N = len(x); with replacement none is needed."""
    small_sq, big_sq = batch_sq_norms(model, loss_fn, x, y, small_batch, accumulation, n_batches,
                                      generator, with_replacement)
    return estimate(small_sq, big_sq, small_batch, small_batch * accumulation,
                    population=None if with_replacement else len(x))


def grad_norms(parameters: Iterable[nn.Parameter]) -> List[torch.Tensor]:
    """The L2 norm of each .grad, as tensors (the caller decides when to sync), from one fused
    kernel over all gradients (what clip_grad_norm_ uses): ~3x cheaper than a norm per tensor,
    which matters twice per measured step in the training loop. Gradients carry no autograd
    history, so no detach. A sparse gradient (nn.Embedding(sparse=True)) has no fused norm: the
    norm of its summed values is its own."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if any(g.is_sparse for g in grads):
        return [g.coalesce().values().norm() if g.is_sparse else g.norm() for g in grads]
    return list(torch._foreach_norm(grads)) if grads else []


def squared_totals(*norm_lists: List[torch.Tensor]) -> List[float]:
    """|g|^2 for each list of per-tensor norms from grad_norms: one host sync for all of them, and
    the squares summed in Python (in double; three fewer tensor ops, which showed in the loop)."""
    flat = [n for norms in norm_lists for n in norms]
    values = torch.stack(flat).tolist() if flat else []
    totals, start = [], 0
    for norms in norm_lists:  # a parameter can get its first gradient after the first micro-batch
        totals.append(sum([v * v for v in values[start:start + len(norms)]], 0.0))
        start += len(norms)
    return totals


class NoiseScaleTracker:
    """B_simple during training, from norms the accumulation micro-steps nearly give away.

    Per optimizer step, feed the squared norms of micro-batch mean gradients and of the
    big-batch mean gradient. The training loop divides each micro-batch loss by the number
    of accumulation steps k, so .grad holds sums of g_m / k; rescale by k^2. Two ways to get
    the micro-batch norms:
    - cheapest: after the first micro-batch's backward, .grad is g_1 / k, so k^2 x its
      squared norm is |g_1|^2 with no copy; after the last, .grad's squared norm is the
      big-batch one (grad_norms after each, squared_totals once at the end). One micro
      norm per step is unbiased, just noisier.
    - all k: snapshot the flattened accumulated grad before each micro-backward; the
      difference after it is g_m / k. That costs a copy and a subtraction of every
      parameter per micro-step (O(parameters) time and one extra gradient of memory).
    With data-parallel training, each rank's gradient before the all-reduce is a micro-batch
    gradient too (with DDP, read it in a communication hook: the all-reduce runs inside
    backward).

    `value` is the ratio of exponential moving averages of the two estimates (a ratio of
    means, as in the paper, over a window of about 1 / (1 - decay) steps). Both averages
    start at zero; the usual start-up debiasing divides both by the same factor, which
    cancels in the ratio.
    """

    def __init__(self, decay: float = 0.95, population: Optional[int] = None):
        self.decay = decay
        self.population = population  # N of the training split when batches are drawn without replacement
        self.grad_sq = 0.0
        self.trace = 0.0
        self.updates = 0

    def update(self, micro_sq_norms: List[float], big_sq_norm: float, micro_batch: int, big_batch: int) -> None:
        small_sq = sum(float(v) for v in micro_sq_norms) / len(micro_sq_norms)
        grad_sq, trace = unbiased_estimates(small_sq, float(big_sq_norm), micro_batch, big_batch, self.population)
        self.grad_sq = self.decay * self.grad_sq + (1 - self.decay) * grad_sq
        self.trace = self.decay * self.trace + (1 - self.decay) * trace
        self.updates += 1

    @property
    def value(self) -> Optional[float]:
        """B_simple, or None before the first update or while |G|^2 is not above the noise."""
        if self.updates == 0 or self.grad_sq <= 0:
            return None
        return self.trace / self.grad_sq
