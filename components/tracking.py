"""W&B tracking. The run directory's own files (metrics.jsonl, summary.json) are the source of
truth; W&B is a view of them across runs. Offline by default, so nothing needs an account."""

import os
from pathlib import Path
from typing import Iterable, List, Optional

from components.config import TrackingConfig
from components.errors import ConfigError

X_AXES = ("samples_seen", "wall_time_s")


def effective_mode(cfg: TrackingConfig) -> str:
    # WANDB_MODE=disabled in the environment switches tracking off everywhere (tests, CI).
    if os.environ.get("WANDB_MODE") == "disabled":
        return "disabled"
    if cfg.mode == "online" and not os.environ.get("WANDB_API_KEY"):
        raise ConfigError("tracking.mode: online needs WANDB_API_KEY in the environment; "
                          "use tracking.mode=offline and `wandb sync` later")
    return cfg.mode


def group_of(cfg: TrackingConfig, run_id: str) -> str:
    """The W&B group of a pipeline run's step runs: tracking.group, or the run's own id."""
    return cfg.group or run_id


def for_schedule(config: dict, schedule: str) -> dict:
    """The config compiled into a schedule: every run it starts (each with its own run id) lands in
    the W&B group named after the schedule, unless tracking.group names one already."""
    if config["tracking"].get("group"):
        return config
    return {**config, "tracking": {**config["tracking"], "group": schedule}}


def follows_live(cfg: TrackingConfig) -> bool:
    """Online W&B runs follow training live; offline ones are written after it (see replay)."""
    return effective_mode(cfg) == "online"


def eval_row(row: dict, train_losses: List[float], lr: Optional[float]) -> dict:
    """What W&B gets per evaluation: the evaluation's row with the mean train loss since the
    previous one and the current LR (one call per evaluation; a wandb.log costs ~1.5 ms here)."""
    extra = {"train/loss": sum(train_losses) / len(train_losses)} if train_losses else {}
    return {**row, **extra, "lr": lr}


def replay(tracker: "Tracker", rows: Iterable[dict]) -> None:
    """Send a finished run's metrics.jsonl rows to W&B as the training loop would have sent
    them live: offline W&B runs are written after training, so the W&B service never competes
    with the training it measures (on 2 cores it made steps up to 10x slower)."""
    losses, lr = [], None
    for row in rows:
        if "train/loss" in row:
            if row["train/loss"] is not None:  # null: a non-finite loss (strict JSON)
                losses.append(row["train/loss"])
            lr = row["lr"]
            tracker.log_train(row)
        elif any(key.startswith("val/") for key in row):
            tracker.log(eval_row(row, losses, lr))
            losses = []


class Tracker:
    """One W&B run of one pipeline step (job_type probe, train, evaluate, promote; study) of one
    pipeline run, id <run_id>-<job_type>, in the group `group_of` names (a study passes its own)."""

    def __init__(self, cfg: TrackingConfig, run_dir: Path, run_id: str, job_type: str, config: dict,
                 group: Optional[str] = None):
        self.mode = effective_mode(cfg)
        self.log_every = cfg.log_every_steps
        self.run = None
        if self.mode == "disabled":
            return
        import wandb

        self.run = wandb.init(
            mode=self.mode, project=cfg.project, entity=cfg.entity, group=group or group_of(cfg, run_id),
            job_type=job_type,
            id=f"{run_id}-{job_type}", name=f"{run_id}-{job_type}", resume="allow",
            dir=str(run_dir), config=config, settings=wandb.Settings(silent=True, console="off", x_disable_stats=True, x_disable_machine_info=True, disable_git=True, disable_code=True),
        )
        for axis in X_AXES:
            self.run.define_metric(axis)
        self.run.define_metric("*", step_metric="samples_seen")

    def log_train(self, row: dict) -> None:
        if self.run is not None and self.log_every and row["step"] % self.log_every == 0:
            self.run.log(row)

    def log(self, row: dict) -> None:
        if self.run is not None:
            self.run.log(row)

    def summarize(self, values: dict) -> None:
        if self.run is not None:
            self.run.summary.update(values)

    @property
    def offline_dir(self) -> Optional[str]:
        return self.run.dir.rsplit("/files", 1)[0] if self.run is not None and self.mode == "offline" else None

    def finish(self, failed: bool = False) -> None:
        if self.run is not None:
            self.run.finish(exit_code=1 if failed else 0)
            self.run = None
            import wandb

            # finish() can return before the service has written the run file out (a copy taken
            # right after once held only its 7-byte header); teardown waits for the service to
            # exit, so the run's files are whole before a step publishes them (~0 s here)
            wandb.teardown()
