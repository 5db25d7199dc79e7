"""The critical batch size from steps-to-target at several batch sizes (GUIDE.md, section 6).

McCandlish et al. 2018, "An Empirical Model of Large-Batch Training": the steps to reach a
target at effective batch B follow S(B) = S_min (1 + B_crit / B), so the samples follow
E(B) = B S(B) = E_min (1 + B / B_crit) with E_min = S_min B_crit. Far below B_crit doubling the
batch halves the steps for free; far above it, it buys almost no steps and doubles the samples.

Limiting cases. The fit works on log B_crit, bounded to [smallest batch / 1e4, largest x 1e4]
(beyond that the curve is within 1e-4 in log S of flat, or of pure 1/B, over the ladder).
If the data show no saturation (S ~ 1/B throughout), B_crit runs to the upper bound: only
E_min = S_min B_crit is measured, so b_crit and s_min are returned as finite numbers whose
errors are inf. If the data show no scaling (S flat), B_crit runs to the lower bound: s_min is
measured, b_crit and e_min carry inf errors. An interior but poorly determined B_crit (e.g. a
ladder that only grazes the knee) gives large, finite errors from the covariance.
"""

import math
from dataclasses import asdict, dataclass
from typing import Iterable, Optional

import numpy as np
from components.errors import DataError

# Regime thresholds on |d log S / d log B| = B_crit / (B + B_crit). Above 0.8 (B <= B_crit/4) a
# doubling of the batch still removes >= 40% of the steps, close to the ideal 50%: "perfect
# scaling". Below 0.2 (B >= 4 B_crit) it removes <= 10% of the steps while costing >= 80% more
# samples: "no further gain". In between the returns diminish.
PERFECT_SCALING_SLOPE = 0.8
NO_GAIN_SLOPE = 0.2

# How far past the batch-size ladder B_crit may go. Beyond a factor 1e4 the curve is
# indistinguishable from pure 1/B (or flat) over the ladder, so the data cannot tell.
B_CRIT_BOUND_FACTOR = 1e4

NO_RUN = "no run reached the target: cannot fit the critical batch size"


@dataclass
class CriticalBatchFit:
    s_min: float  # steps at infinite batch
    s_min_err: float  # 1-sigma; inf when the data show no saturation
    e_min: float  # samples at vanishing batch, S_min * B_crit
    e_min_err: float  # 1-sigma; inf when the data show no scaling
    b_crit: float  # E_min / S_min
    b_crit_err: float  # 1-sigma; inf when B_crit ran to a bound
    n_points: int  # runs that reached the target
    n_batch_sizes: int  # distinct batch sizes among them
    rms_log_residual: float  # rms of log(observed / fitted steps); 0.05 ~ 5% scatter

    def steps_at(self, b):
        """Predicted steps to target at batch b (a number or an array)."""
        return _scalar_or_array(self.s_min * (1.0 + self.b_crit / np.asarray(b, dtype=float)))

    def samples_at(self, b):
        """Predicted samples to target at batch b (a number or an array)."""
        return _scalar_or_array(self.s_min * (np.asarray(b, dtype=float) + self.b_crit))

    def to_dict(self) -> dict:
        """Plain Python numbers; an undetermined (inf or nan) value becomes None so that the
        dict is strict JSON."""
        return {k: (v if isinstance(v, int) else (float(v) if math.isfinite(v) else None))
                for k, v in asdict(self).items()}


def _scalar_or_array(x: np.ndarray):
    return float(x) if np.ndim(x) == 0 else x


def _clean(batch_sizes: Iterable, steps: Iterable):
    """(B, S) arrays of the runs that reached the target; DataError on anything unusable."""
    batch_sizes, steps = list(batch_sizes), list(steps)
    if len(batch_sizes) != len(steps):
        raise DataError(f"{len(batch_sizes)} batch sizes but {len(steps)} step counts: "
                        "one of each per run is needed")
    b = np.array([np.nan if v is None else v for v in batch_sizes], dtype=float)
    s = np.array([np.nan if v is None else v for v in steps], dtype=float)
    bad_b = np.flatnonzero(~(np.isfinite(b) & (b > 0)))
    if bad_b.size:
        raise DataError(f"batch sizes must be positive numbers; got {batch_sizes[bad_b[0]]}")
    reached = np.isfinite(s)  # None/NaN/inf: the run did not reach the target
    b, s = b[reached], s[reached]
    if b.size == 0:
        raise DataError(NO_RUN)
    if np.any(s <= 0):
        raise DataError(f"steps to target must be positive; got {s[s <= 0][0]:g}")
    n_sizes = np.unique(b).size
    if n_sizes < 3:
        raise DataError(f"only {n_sizes} batch size{'s' if n_sizes != 1 else ''} reached the "
                        "target; the fit needs at least 3")
    return b, s


def _profile_start(log_b: np.ndarray, log_s: np.ndarray, log_lo: float, log_hi: float):
    """(log S_min, log B_crit) to start from, and whether it lies on a bound. For a fixed B_crit
    the best log S_min is a mean, so the sum of squares is a function of B_crit alone: scan it
    on a grid (30 points per decade) over the allowed range. A best point on the edge of the
    grid means the data want B_crit beyond the range (pure 1/B, or flat)."""
    grid = np.linspace(log_lo, log_hi, int(np.ceil((log_hi - log_lo) / np.log(10) * 30)) + 1)
    shape = np.logaddexp(0.0, grid[:, None] - log_b[None, :])  # log(1 + B_crit / B)
    log_s_min = np.mean(log_s - shape, axis=1)
    ssr = np.sum((log_s_min[:, None] + shape - log_s) ** 2, axis=1)
    best = int(np.argmin(ssr))
    bound = -1 if best == 0 else (1 if best == grid.size - 1 else 0)
    return np.array([log_s_min[best], grid[best]]), bound


def _covariance(jac: np.ndarray, s2: float) -> np.ndarray:
    """s2 (J^T J)^-1, with column scaling so that badly scaled columns are not mistaken for
    singular ones; all inf when the columns are (numerically) collinear."""
    norms = np.linalg.norm(jac, axis=0)
    if np.any(norms == 0) or not np.all(np.isfinite(norms)):
        return np.full((2, 2), np.inf)
    scaled = jac / norms
    jtj = scaled.T @ scaled
    if np.linalg.cond(jtj) > 1e12:
        return np.full((2, 2), np.inf)
    return s2 * np.linalg.inv(jtj) / np.outer(norms, norms)


def fit_critical_batch(batch_sizes: Iterable[float],
                       steps: Iterable[Optional[float]]) -> CriticalBatchFit:
    """Fit S(B) = S_min (1 + B_crit / B) to one (batch size, steps to target) point per run.

    A batch size may repeat (one point per seed). Steps None or NaN mean the run never reached
    the target; those points are dropped. The fit is least squares on log S (noise taken as
    multiplicative) over (log S_min, log B_crit), started from a scan of B_crit (see
    _profile_start; unlike the linear regression S = a + c/B it needs no fallback when a or c
    comes out negative). Errors are 1-sigma from the covariance, scaled by the residual
    variance, and carried to S_min, E_min, B_crit by the delta method. See the module docstring
    for data that show no saturation or no scaling.
    """
    # scipy only here: importing it costs ~0.9 s, and pipelines.submit imports this module
    from scipy.optimize import least_squares
    from scipy.special import expit

    b, s = _clean(batch_sizes, steps)
    log_b, log_s = np.log(b), np.log(s)
    log_lo = math.log(b.min() / B_CRIT_BOUND_FACTOR)
    log_hi = math.log(b.max() * B_CRIT_BOUND_FACTOR)

    def residuals(p):
        return p[0] + np.logaddexp(0.0, p[1] - log_b) - log_s

    def jacobian(p):  # d/d log S_min = 1; d/d log B_crit = B_crit / (B + B_crit)
        return np.column_stack([np.ones_like(log_b), expit(p[1] - log_b)])

    p, bound = _profile_start(log_b, log_s, log_lo, log_hi)
    if bound == 0:  # polish the grid point; B_crit stays inside the range
        result = least_squares(residuals, p, jac=jacobian, method="trf",
                               bounds=([-np.inf, log_lo], [np.inf, log_hi]),
                               xtol=1e-15, ftol=1e-15, gtol=1e-15)
        p, bound = result.x, int(result.active_mask[1])
    res = residuals(p)
    n = b.size
    s2 = float(res @ res) / max(n - 2, 1)  # residual variance of log S

    if bound:
        # B_crit on a bound: not measured. Holding it there, the one free parameter is
        # log S_min (lower bound, the flat case) or log E_min (upper bound, pure 1/B), each with
        # variance s2 / n; the other two quantities are undetermined (inf error).
        var_log_s_min = s2 / n if bound < 0 else np.inf
        var_log_e_min = s2 / n if bound > 0 else np.inf
        var_log_b_crit = np.inf
    else:
        jac = jacobian(p)
        cov_p = _covariance(jac, s2)  # (log S_min, log B_crit)
        # (log E_min, log B_crit): log S_min = log E_min - log B_crit. Computing var(log E_min)
        # in its own parametrization avoids cancelling two huge numbers when S ~ 1/B.
        cov_q = _covariance(np.column_stack([jac[:, 0], jac[:, 1] - jac[:, 0]]), s2)
        var_log_s_min, var_log_b_crit, var_log_e_min = cov_p[0, 0], cov_p[1, 1], cov_q[0, 0]

    log_s_min, log_b_crit = p
    s_min, b_crit = math.exp(log_s_min), math.exp(log_b_crit)
    e_min = s_min * b_crit
    return CriticalBatchFit(
        s_min=s_min, s_min_err=s_min * math.sqrt(var_log_s_min),
        e_min=e_min, e_min_err=e_min * math.sqrt(var_log_e_min),
        b_crit=b_crit, b_crit_err=b_crit * math.sqrt(var_log_b_crit),
        n_points=int(n), n_batch_sizes=int(np.unique(b).size),
        rms_log_residual=float(np.sqrt(np.mean(res ** 2))),
    )


def _ratio(batch: float, b_crit: float) -> float:
    if not batch > 0 or not b_crit >= 0:
        raise ValueError(f"need batch > 0 and b_crit >= 0; got batch={batch}, b_crit={b_crit}")
    return batch / b_crit if b_crit > 0 else math.inf


def regime(batch: float, b_crit: float) -> str:
    """Where batch sits on the fitted curve, judged by its local slope
    |d log S / d log B| = B_crit / (B + B_crit)."""
    slope = 1.0 / (1.0 + _ratio(batch, b_crit))
    if slope >= PERFECT_SCALING_SLOPE:
        return "perfect scaling"
    if slope <= NO_GAIN_SLOPE:
        return "no further gain"
    return "diminishing returns"


def doubling_saves(b: float, b_crit: float) -> float:
    """Fraction of the steps saved by going from batch b to 2b: 1 - S(2b)/S(b)
    = 0.5 / (1 + b/B_crit); 0.5 far below B_crit, 0 far above."""
    return 0.5 / (1.0 + _ratio(b, b_crit))


def doubling_costs(b: float, b_crit: float) -> float:
    """Extra samples, as a fraction, for going from batch b to 2b: E(2b)/E(b) - 1
    = (b/B_crit) / (1 + b/B_crit); 0 far below B_crit, 1 (twice the samples) far above."""
    return 1.0 - 1.0 / (1.0 + _ratio(b, b_crit))
