"""One training run's record: what training returns, what summary.json holds, what the study
keeps per run and what `submit` prints. One type, so its readers and writers cannot drift apart.

The trainer returns it (components/training.py `Trainer.result`); the evaluate step completes
it with the test metrics (`RunRecord.from_training`); it is read back with
`RunRecord.from_dict`, which tolerates a record from an older run (missing keys keep their defaults).
"""

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, List, Optional

SUMMARY_FILE = "summary.json"  # in the run's store: while training a progress note (status running), then the record


@dataclass
class RunRecord:
    run_id: Optional[str]
    status: str  # completed | diverged (failed / interrupted are written by submit)
    stop_reason: Optional[str] = None
    divergence: Optional[dict] = None  # {rule, detail, step, lr, advice} when diverged
    task: Optional[str] = None
    task_inferred: Optional[bool] = None  # data.task was not given: data_prep inferred it
    effective_batch_size: Optional[int] = None
    micro_batch_size: Optional[int] = None  # at the end: smaller than planned after an out-of-memory retry
    accumulation_steps: Optional[int] = None
    world_size: Optional[int] = None
    lr: Optional[float] = None  # peak LR after scaling to the effective batch
    optimizer: Optional[str] = None
    optimizer_steps: Optional[int] = None
    epochs: Optional[float] = None
    samples_seen: Optional[int] = None
    steps_per_epoch: Optional[int] = None
    max_steps: Optional[int] = None  # the planned budget: train.max_steps or max_epochs x steps_per_epoch
    wall_time_s: Optional[float] = None
    eval_time_s: Optional[float] = None  # of wall_time_s, spent evaluating
    best_metric: dict = field(default_factory=dict)  # {name, value, step}; value None: no finite evaluation
    test: dict = field(default_factory=dict)  # test metrics without the "test/" prefix; {} without a model
    target: Optional[float] = None
    steps_to_target: Optional[int] = None
    samples_to_target: Optional[int] = None
    time_to_target_s: Optional[float] = None  # wall time, evaluations included
    train_time_to_target_s: Optional[float] = None  # the same less the evaluations before the target
    resumed_from_step: Optional[int] = None
    data_version: Optional[str] = None
    config_hash: Optional[str] = None
    counts: Optional[dict] = None  # examples per split
    wandb_dir: Optional[str] = None
    oom_events: List[dict] = field(default_factory=list)
    gns_b_simple: Optional[float] = None  # the noise scale tracked while training, at the end
    probe: Optional[dict] = None  # what the probe chose and why; None when it did not run

    @classmethod
    def from_training(cls, outcome: Dict[str, Any], run_id: Optional[str], optimizer: str, target: Optional[float],
                      manifest: dict, test: dict, probe: Optional[dict] = None) -> "RunRecord":
        """The record of a trained run: train's outcome (the trainer's RunRecord as a dict and what
        components.train adds), the dataset manifest and the test metrics."""
        known = {f.name for f in fields(cls)}
        return cls(**{**{k: v for k, v in outcome.items() if k in known},
                      "run_id": run_id, "optimizer": optimizer, "target": target, "task": manifest["task"],
                      "task_inferred": manifest.get("task_inferred"), "counts": manifest["counts"],
                      "data_version": manifest["data_version"],
                      "test": {k.removeprefix("test/"): v for k, v in test.items()}, "probe": probe})

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "RunRecord":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_dict(self) -> dict:
        return asdict(self)

    def divergence_line(self) -> str:
        """One line for a diverged run: the rule, the step, the LR and what to try (tolerates a
        record from a step that failed half-way)."""
        d = self.divergence or {}
        lr = d.get("lr")
        return (f"diverged: {d.get('rule') or self.stop_reason or 'unknown rule'} at step {d.get('step', '?')} "
                f"(lr {'?' if lr is None else format(lr, 'g')}): {d.get('advice') or 'lower train.lr'}")

    @property
    def reached_target(self) -> bool:
        return self.steps_to_target is not None

    @property
    def epochs_to_target(self) -> Optional[float]:
        if self.samples_to_target is None or not self.counts:
            return None
        return self.samples_to_target / self.counts["train"]

    @property
    def train_time_s(self) -> Optional[float]:
        """Wall time less the evaluations: the training's own time."""
        if self.wall_time_s is None:
            return None
        return self.wall_time_s - (self.eval_time_s or 0.0)
