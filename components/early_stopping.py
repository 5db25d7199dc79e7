"""When to stop: patience, target, divergence. Pure bookkeeping over a metric sequence, so
each rule is tested on scripted sequences without training anything.

Divergence (a status, never a result: see docs in README "Stopping") is one of four rules:
- non_finite: the train loss, or an evaluation, is NaN/inf;
- collapse: the monitored metric improved on where it started (the untrained model's score,
  see `start`; else the first evaluation) by a clear gain G (more than eval.min_delta and 5% of
  the start's magnitude), then fell back to within 10% of G of the start in two evaluations in
  a row: what training at too high an LR does (seen: val/accuracy 0.10 -> 0.94 -> 0.10 and
  staying there). Starting from the untrained score matters: the first evaluation comes after an
  epoch, and a noisy dip below it (val/r2 0.50 -> 0.21 on a 66-row split) is no collapse;
- loss_exploded: the mean train loss since the last evaluation is over 10x the first step's
  loss (the metric may sit at chance and never "improve", e.g. AdamW at a huge LR);
- threshold: the monitored metric is worse than eval.divergence_threshold.
"""

import math
from dataclasses import asdict, dataclass
from typing import Optional

# stop reasons, as they appear in summary.json
TARGET_REACHED = "target_reached"
PATIENCE = "early_stopping"
DIVERGED = "diverged"
NON_FINITE = "non_finite_loss"
MAX_STEPS = "max_steps"
MAX_EPOCHS = "max_epochs"

# divergence rules (summary.json: divergence.rule)
RULE_NON_FINITE = "non_finite"
RULE_COLLAPSE = "collapse"
RULE_LOSS_EXPLODED = "loss_exploded"
RULE_THRESHOLD = "threshold"

COLLAPSE_KEEP = 0.1  # fell back to within this fraction of the gain from the first evaluation
COLLAPSE_MIN_GAIN = 0.05  # ...after a gain of at least this fraction of |first value|
COLLAPSE_EVALS = 2  # ...in this many evaluations in a row (one can be noise on a small split)
LOSS_EXPLOSION = 10.0  # mean train loss over this multiple of the first step's loss


@dataclass
class EarlyStopping:
    mode: str  # "max" or "min"
    patience: int  # evaluations without improvement before stopping
    min_delta: float = 0.0
    target: Optional[float] = None
    divergence_threshold: Optional[float] = None
    stop_at_target: bool = True  # False: record the step the target is reached, keep training
    # state
    best: Optional[float] = None  # best value seen: its weights are the ones restored
    best_step: Optional[int] = None
    first: Optional[float] = None  # where it started (see `start`): where a collapse falls back to
    reference: Optional[float] = None  # value at the last improvement larger than min_delta
    bad_evals: int = 0
    fallen_evals: int = 0  # consecutive evaluations back at the first one's level
    target_step: Optional[int] = None
    stop_reason: Optional[str] = None
    divergence_rule: Optional[str] = None
    divergence_detail: Optional[str] = None  # one line: what happened, with the numbers

    def _better(self, value: float, than: float, margin: float) -> bool:
        return value > than + margin if self.mode == "max" else value < than - margin

    def _diverge(self, rule: str, detail: str, reason: str = DIVERGED) -> None:
        self.stop_reason, self.divergence_rule, self.divergence_detail = reason, rule, detail

    def start(self, value: float) -> None:
        """The untrained model's score: the level a collapse falls back to. Not a candidate for
        the best weights (nothing was trained)."""
        if math.isfinite(value):
            self.first = value

    def update(self, value: float, step: int, name: str = "metric") -> bool:
        """Record one evaluation; True if this value is the new best (weights worth keeping)."""
        if not math.isfinite(value):
            self._diverge(RULE_NON_FINITE, f"{name} became {value} at step {step}", NON_FINITE)
            return False
        if self.first is None:
            self.first = value
        if self.reference is None or self._better(value, self.reference, self.min_delta):
            self.reference, self.bad_evals = value, 0
        else:
            self.bad_evals += 1
        improved = self.best is None or self._better(value, self.best, 0.0)
        if improved:
            self.best, self.best_step = value, step
        if self.target is not None and self.target_step is None and not self._better(self.target, value, 0.0):
            self.target_step = step
            if self.stop_at_target:
                self.stop_reason = TARGET_REACHED
                return improved
        gain = max(0.0, self.best - self.first if self.mode == "max" else self.first - self.best)
        significant = gain > max(self.min_delta, COLLAPSE_MIN_GAIN * abs(self.first))
        fell_back = significant and not self._better(value, self.first, COLLAPSE_KEEP * gain)
        self.fallen_evals = self.fallen_evals + 1 if fell_back else 0
        if self.fallen_evals >= COLLAPSE_EVALS:
            self._diverge(RULE_COLLAPSE, f"{name} fell back to {value:.4g} at step {step} after reaching "
                                         f"{self.best:.4g} at step {self.best_step} (it started at {self.first:.4g})")
        elif self.divergence_threshold is not None and self._better(self.divergence_threshold, value, 0.0):
            self._diverge(RULE_THRESHOLD, f"{name} {value:.4g} at step {step} is worse than "
                                          f"eval.divergence_threshold {self.divergence_threshold:g}")
        elif self.bad_evals >= self.patience:
            self.stop_reason = PATIENCE
        return improved

    def train_loss(self, mean_loss: float, first_loss: float, step: int) -> None:
        """The mean train loss since the last evaluation, against the first step's loss."""
        if first_loss > 0 and mean_loss > LOSS_EXPLOSION * first_loss:
            self._diverge(RULE_LOSS_EXPLODED, f"train loss {mean_loss:.4g} before step {step} is over "
                                              f"{LOSS_EXPLOSION:g}x the first step's {first_loss:.4g}")

    def non_finite_loss(self, value: float, step: int) -> None:
        self._diverge(RULE_NON_FINITE, f"train loss became {value} at step {step}", NON_FINITE)

    @property
    def diverged(self) -> bool:
        return self.divergence_rule is not None

    @property
    def should_stop(self) -> bool:
        return self.stop_reason is not None

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)
