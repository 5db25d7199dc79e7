"""The largest micro-batch that fits a device's memory, found in a few trials.

A trial runs one training micro-step (forward + backward) at micro-batch b and returns its peak
memory in bytes, or raises an out-of-memory error. A micro-batch *fits* when its trial does not
run out of memory and its peak stays within the usable budget, (1 - margin) x budget; the margin
leaves room for what one trial does not show (fragmentation, evaluation). What a training step
holds beyond one forward + backward is counted in the trial (`held_bytes`): the optimizer's state,
which its first update allocates, and across ranks the all-reduce's flat gradient buffer.

The search (`find_max_micro_batch`) models memory as fixed + per_sample x b, fitted through the
last two micro-batches that fitted. Each peak is known only to within `resolution_bytes` (the
allocator rounds to blocks), so the slope has an upper and a lower bound, and each gives a
prediction of the largest b within the usable budget:
  - safe: with the upper slope; with a single point, as if nothing were fixed (fixed >= 0), so
    for linear memory it fits. The next trial is the safe prediction, capped by `cap`.
  - optimistic: with the lower slope; no larger b can fit. Once it (or the smallest failure) is
    within `tolerance` of the largest fit, stop: that fit is the answer, and for memory that is
    linear up to `resolution_bytes` it is provably within `tolerance` (4%) of the true largest.
With a small probe (8) first, the second trial spans most of the free memory, and the third
usually lands within a few percent: 3 trials, sometimes 4 (see tests/test_memory.py). Only if a
trial fails (out of memory, or a peak over the usable budget: memory grew faster than linear)
does the search bisect between the last fit and the failure, at the point interpolated on their
peaks when the failure measured one, at the midpoint when it ran out of memory (never above the
optimistic bound). Bisection assumes memory grows with b; a device whose peak jumps around by
more than `resolution_bytes` from one shape to the next can leave the answer further below.
The answer is always a micro-batch whose trial fitted. It is not rounded to a multiple of 8:
the caller still has to pick a micro-batch that divides the effective batch, and rounding both
ways would give up more than the 5% this search aims for.

On CPU nothing runs out of memory before the machine swaps, so "fits" means fits a stated
budget (the config's probe.memory_budget_gb); `cpu_trial` measures what one micro-step needs.
"""

import gc
import math
import traceback
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple, TypeVar

import torch
from torch import nn

from components.errors import UserInputError

MiB = 1 << 20
GiB = 1 << 30


class DoesNotFit(UserInputError):
    """Even the smallest allowed micro-batch needs more memory than the budget gives."""


def is_oom(exc: BaseException) -> bool:
    """An out-of-memory error from any backend (torch.cuda.OutOfMemoryError is torch.OutOfMemoryError;
    older builds and other backends raise a RuntimeError that says so; the CPU allocator says
    "can't allocate memory")."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    message = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in message or "can't allocate memory" in message)


def release_memory() -> None:
    """Free what a caught OOM left behind, so it does not poison the rest of the run.

    The caller must first drop its own references to the failed step's tensors (its locals, and the
    exception's traceback, whose frames hold them): memory still referenced cannot be freed.
    """
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


T = TypeVar("T")


def halving_on_oom(run: Callable[[int], T], size: int, smaller: Callable[[int], int] = lambda s: s // 2,
                   on_oom: Optional[Callable[[int, int], None]] = None) -> Tuple[T, int]:
    """run(size); after an out-of-memory error, free what the failed attempt held and retry with
    smaller(size), down to 1. Returns (result, the size that worked). `on_oom(old, new)` runs
    before each retry (e.g. to clear accumulated gradients and record the event)."""
    while True:
        try:
            return run(size), size
        except Exception as exc:  # noqa: BLE001 - only out-of-memory is handled
            if not is_oom(exc) or size == 1:
                raise
            traceback.clear_frames(exc.__traceback__)  # its frames hold the failed attempt's tensors
        release_memory()
        new = smaller(size)
        if on_oom is not None:
            on_oom(size, new)
        size = new


@dataclass
class FitSearch:
    """The answer and how it was found (every trial, in order)."""

    micro_batch: int  # the answer: the largest micro-batch found to fit (always one that was tried)
    trials: List[Tuple[int, Optional[int]]]  # (micro_batch, peak bytes or None for OOM), in order
    fixed_bytes: float  # of the fitted line; 0 if only one micro-batch was measured
    per_sample_bytes: float
    budget_bytes: int
    margin: float
    reasoning: str

    @property
    def usable_bytes(self) -> float:
        return (1 - self.margin) * self.budget_bytes


def find_max_micro_batch(trial: Callable[[int], int], budget_bytes: int, margin: float = 0.1,
                         cap: int = 1 << 16, min_batch: int = 1, probe: int = 8, tolerance: float = 0.04,
                         resolution_bytes: Optional[int] = None, max_trials: int = 12,
                         on_trial: Optional[Callable[[int, int, Optional[int], bool], None]] = None) -> FitSearch:
    """The largest micro-batch in [min_batch, cap] whose `trial` fits (1 - margin) x budget_bytes.

    `cap` is the training-set size or a configured maximum. `resolution_bytes`: how exactly a trial
    measures its peak; by default the trial's own `resolution_bytes` attribute (cpu_trial: 0, it
    counts bytes; cuda_trial: 2 MiB, the caching allocator's block), else 2 MiB. Raise it for a
    device whose peak varies with the shape (cuDNN workspaces). Raises DoesNotFit if even
    `min_batch` does not fit; stops after `max_trials` with the largest fit so far.
    `on_trial(n, micro_batch, peak or None, fits)` is called after each trial (progress lines).
    """
    if not 1 <= min_batch <= cap:
        raise ValueError(f"need 1 <= min_batch <= cap, got min_batch={min_batch}, cap={cap}")
    usable = (1 - margin) * budget_bytes
    if resolution_bytes is None:
        resolution_bytes = getattr(trial, "resolution_bytes", 2 * MiB)
    trials: List[Tuple[int, Optional[int]]] = []
    fits = {}  # micro_batch -> peak, for those that fitted
    peaks = {}  # micro_batch -> peak or None (out of memory), for those that did not

    def attempt(b: int) -> bool:
        try:
            peak = int(trial(b))
        except Exception as exc:  # noqa: BLE001 - anything but an OOM goes back to the caller
            if not is_oom(exc):
                raise
            peak = None  # the exception is not kept: its traceback holds the failed step's tensors
        if peak is None:
            release_memory()
        trials.append((b, peak))
        fitted = peak is not None and peak <= usable
        if on_trial is not None:
            on_trial(len(trials), b, peak, fitted)
        if fitted:
            fits[b] = peak
            return True
        peaks[b] = peak
        return False

    b1 = min(max(probe, min_batch), cap)
    lo, hi = 0, None  # largest fitting, smallest failing micro-batch
    if attempt(b1):
        lo = b1
    elif b1 > min_batch and attempt(min_batch):
        lo, hi = min_batch, b1
    else:
        raise DoesNotFit(_does_not_fit(trials, budget_bytes, margin))

    while len(trials) < max_trials and lo < cap:
        safe, optimistic = _predict(fits, lo, usable, resolution_bytes)
        top = math.floor(min(optimistic, cap, hi - 1 if hi else cap))  # no larger micro-batch can fit
        if top <= lo * (1 + tolerance):
            break
        if hi is None:  # safe if that gets us somewhere, else halfway to optimistic (at most double)
            b = safe if safe > lo * (1 + tolerance) else min((max(safe, lo) + top) / 2, 2 * lo)
        elif peaks[hi] is not None:  # interpolate on the two peaks that bracket the budget
            b = lo + (usable - fits[lo]) * (hi - lo) / (peaks[hi] - fits[lo])
            # Keep an eighth of the interval away from lo, so a curved peak cannot stall the
            # search. Near hi, step back twice as far as the interpolation says: a small
            # overshoot (peak noise, or a one-off transient in the first trial that skewed the
            # line, as on an H200) has its answer just below hi, not an eighth of the way down.
            if b > hi - (hi - lo) / 8:
                b = 2 * b - hi
            b = min(max(b, lo + (hi - lo) / 8), hi - 1)
        else:  # out of memory tells us nothing about how far: bisect
            b = (lo + hi) / 2
        b = min(max(math.floor(b), lo + 1), top)
        if attempt(b):
            lo = b
        else:
            hi = b

    fixed, per_sample = _line(fits, lo)
    why = (f"largest fitting micro-batch {lo} ({len(trials)} trials): {_fmt(fixed)} fixed + "
           f"{_fmt(per_sample)}/sample within {1 - margin:.0%} of {_fmt(budget_bytes)}")
    if lo == cap:
        why += f", capped at {cap}"
    elif len(trials) == max_trials:
        why += f", stopped after max_trials={max_trials}"
    return FitSearch(lo, trials, fixed, per_sample, budget_bytes, margin, why)


def _line(fits: dict, lo: int) -> Tuple[float, float]:
    """(fixed, per-sample) bytes on the line through lo and the fit before it; with one point, all
    of it per-sample (the safe reading)."""
    if len(fits) == 1:
        return 0.0, fits[lo] / lo
    prev = max(b for b in fits if b < lo)
    per_sample = (fits[lo] - fits[prev]) / (lo - prev)
    return fits[lo] - per_sample * lo, per_sample


def _predict(fits: dict, lo: int, usable: float, resolution: float) -> Tuple[int, float]:
    """(safe, optimistic): the largest b within usable, extrapolated from lo with the upper and the
    lower bound on the slope of the line through lo and the fit before it."""
    most = fits[lo] / lo  # the slope if nothing were fixed; fixed >= 0, so no steeper
    if len(fits) == 1:
        return math.floor(lo + (usable - resolution - fits[lo]) / most), math.inf
    prev = max(b for b in fits if b < lo)
    rise = fits[lo] - fits[prev]
    high = min(most, (rise + resolution) / (lo - prev))
    high = high if high > 0 else most  # noise hid the growth
    low = (rise - resolution) / (lo - prev)
    safe = lo + (usable - resolution - fits[lo]) / high  # minus resolution: the next peak rounds up too
    optimistic = lo + (usable - fits[lo]) / low if low > 0 else math.inf
    return math.floor(safe), optimistic


def _does_not_fit(trials: list, budget_bytes: int, margin: float) -> str:
    measured = sorted((b, peak) for b, peak in trials if peak is not None)
    if len(measured) >= 2:
        (b0, p0), (b1, p1) = measured[0], measured[-1]
        per_sample = (p1 - p0) / (b1 - b0)
        need = f"{_fmt(p1 - per_sample * b1)} fixed + {_fmt(per_sample)} per sample"
    elif measured:
        need = f"{_fmt(measured[0][1])} at micro-batch {measured[0][0]}"
    else:
        need = "more than the whole budget (out of memory)"
    return (f"even micro-batch {trials[-1][0]} does not fit: one micro-step needs {need}, over the usable "
            f"{_fmt((1 - margin) * budget_bytes)} ({1 - margin:.0%} of the {_fmt(budget_bytes)} budget); "
            f"use a smaller model or a larger memory budget")


def _fmt(n: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


# ---------------------------------------------------------------- measuring a micro-step


def cuda_trial(step: Callable[[int], None], device, held_bytes: int = 0) -> Callable[[int], int]:
    """A trial from `step(b)` (one forward + backward at micro-batch b on `device`): the step's peak
    allocated bytes. On OOM, frees what the step left and re-raises.

    `held_bytes`: what a training step holds that this step does not allocate: the optimizer's
    state (created by its first update, which a trial does not run) and, across ranks, the
    all-reduce's flat buffer (components/distributed.py). One buffer of that size stays allocated
    while the trial lives (`trial.held`), so every peak includes it."""
    held = torch.empty(held_bytes, dtype=torch.uint8, device=device) if held_bytes else None

    def trial(b: int) -> int:
        torch.cuda.reset_peak_memory_stats(device)
        oom = None
        try:
            step(b)
            torch.cuda.synchronize(device)
        except Exception as exc:  # noqa: BLE001
            if not is_oom(exc):
                raise
            traceback.clear_frames(exc.__traceback__)  # the failed step's tensors live in these frames
            oom = exc
        if oom is not None:
            release_memory()
            raise oom
        return torch.cuda.max_memory_allocated(device)

    trial.resolution_bytes = 2 * MiB  # large blocks are rounded up to 2 MiB
    trial.held = held
    return trial


def cpu_trial(model: nn.Module, loss_fn: Callable, x: torch.Tensor, y: torch.Tensor,
              optimizer_state_factor: float = 2.0, held_bytes: int = 0) -> Callable[[int], int]:
    """A trial that measures what one micro-step at micro-batch b needs on CPU, in bytes:

    parameters + their gradients + optimizer state (`optimizer_state_factor` x the trainable
    parameters: 2 for Adam's two moments, 1 for SGD momentum, 0 for plain SGD) + `held_bytes`
    (across ranks, the all-reduce's flat buffer: components/distributed.py)
    + the input batch + every tensor autograd saves for backward during the forward pass (seen by
    saved_tensors_hooks; counted once per storage, because a saved view keeps its whole storage
    alive; parameters and the batch are already counted). Temporaries that die before backward are
    not counted. The model runs in its current mode (in train mode, dropout masks count). Batches
    larger than x repeat its rows. The model's .grad fields are left alone.
    """
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    state = [*params, *model.buffers()]
    fixed = (sum(t.nbytes for t in state) + (1 + optimizer_state_factor) * sum(p.nbytes for p in trainable)
             + held_bytes)
    counted = {t.untyped_storage().data_ptr() for t in state}

    def trial(b: int) -> int:
        rows = torch.arange(b, device=x.device) % len(x)
        xb, yb = x[rows], y[rows]
        known = counted | {xb.untyped_storage().data_ptr(), yb.untyped_storage().data_ptr()}
        saved = {}  # storage data_ptr -> bytes

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            if storage.data_ptr() not in known:
                saved[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = loss_fn(model(xb), yb)
        torch.autograd.grad(loss, trainable, allow_unused=True)  # the backward half; .grad untouched
        return int(fixed + xb.nbytes + yb.nbytes + sum(saved.values()))

    trial.resolution_bytes = 0  # bytes counted, not sampled
    return trial


def first_probe_batch(model: nn.Module, loss_fn: Callable, x: torch.Tensor, y: torch.Tensor, cap: int,
                      at_least: int = 8) -> int:
    """Where a search of real GPU memory should start: past the batch at which activations
    outgrow the gradient buffers.

    Measured on an H200: at small micro-batches the step's peak is set by the gradients (they are
    allocated while backward frees activations), so the peak hardly grows with the batch; two
    small probes then underestimate the per-sample cost ~15x and the search overshoots into
    out-of-memory. The activations one sample keeps for backward are counted exactly here (on any
    device) from two tiny forward passes, and the search starts where they are twice the
    gradient bytes."""
    measure = cpu_trial(model, loss_fn, x, y, optimizer_state_factor=0.0)
    per_sample = (measure(2 * at_least) - measure(at_least)) / at_least
    gradient_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    if per_sample <= 0:
        return min(at_least, cap)
    return int(min(cap, max(at_least, math.ceil(2 * gradient_bytes / per_sample))))


# ---------------------------------------------------------------- a fake device for tests


@dataclass
class SimulatedDevice:
    """A fake allocator: peak = (fixed + per_sample x b + quadratic x b^2) x (1 +- noise), rounded up
    to `block_bytes`. The noise is a fixed pseudo-random function of b (like cuDNN picking another
    algorithm, with another workspace, per shape). Over budget, `trial` raises the error the trainer
    catches, torch.OutOfMemoryError."""

    budget_bytes: int
    fixed_bytes: int
    per_sample_bytes: int
    quadratic_bytes: float = 0.0
    noise: float = 0.0
    block_bytes: int = 2 * MiB
    calls: int = field(default=0, init=False)

    def peaks(self, b: torch.Tensor) -> torch.Tensor:
        b = b.to(torch.float64)
        raw = self.fixed_bytes + self.per_sample_bytes * b + self.quadratic_bytes * b * b
        wobble = torch.frac(torch.sin(b * 12.9898) * 43758.5453).abs() * 2 - 1  # in [-1, 1)
        return torch.ceil(raw * (1 + self.noise * wobble) / self.block_bytes) * self.block_bytes

    def trial(self, b: int) -> int:
        self.calls += 1
        peak = int(self.peaks(torch.tensor([b]))[0])
        if peak > self.budget_bytes:
            raise torch.OutOfMemoryError(f"Simulated out of memory: micro-batch {b} needs {_fmt(peak)} "
                                         f"of {_fmt(self.budget_bytes)}")
        return peak

    def true_max(self, cap: int, margin: float = 0.1) -> int:
        """The largest b in [1, cap] within (1 - margin) x budget, by exhaustive scan (0 if none)."""
        b = torch.arange(1, cap + 1)
        fitting = b[self.peaks(b) <= (1 - margin) * self.budget_bytes]
        return int(fitting.max()) if len(fitting) else 0
