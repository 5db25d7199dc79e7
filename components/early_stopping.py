"""When to stop: patience, target, divergence. Pure bookkeeping over a metric sequence, so
each rule is tested on scripted sequences without training anything."""

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
    reference: Optional[float] = None  # value at the last improvement larger than min_delta
    bad_evals: int = 0
    target_step: Optional[int] = None
    stop_reason: Optional[str] = None

    def _better(self, value: float, than: float, margin: float) -> bool:
        return value > than + margin if self.mode == "max" else value < than - margin

    def update(self, value: float, step: int) -> bool:
        """Record one evaluation; True if this value is the new best (weights worth keeping)."""
        if not math.isfinite(value):
            self.stop_reason = NON_FINITE
            return False
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
        if self.divergence_threshold is not None and self._better(self.divergence_threshold, value, 0.0):
            self.stop_reason = DIVERGED
        elif self.bad_evals >= self.patience:
            self.stop_reason = PATIENCE
        return improved

    def non_finite_loss(self) -> None:
        self.stop_reason = NON_FINITE

    @property
    def should_stop(self) -> bool:
        return self.stop_reason is not None

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)
