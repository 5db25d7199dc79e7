"""The trainer's own cost per optimizer step, beside the probe's bare step: what the probe adds to
the throughput ladder's pace when it predicts how long training takes.

The ladder (components/throughput.py) times a bare training step (gather by index, forward,
backward, update, one sync) in a tight loop. A training run's step also does the trainer's own
work (components/training.py: the LR, the out-of-memory guard, the loss read back, the metrics
row, the checks for evaluations, checkpoints and signals), a roughly fixed cost per optimizer
step whatever the batch: measured in the study runs as ~0.1 ms a step on digits at every batch
from 16 to 512 (BENCHMARKS.md, study timing fidelity), a third of a small batch's step. Predicting
a run's pace from the ladder alone left the study's time predictions 1.4x short at small batches.

So the probe runs the real Trainer for a short burst (about BURST_S seconds, one process, no run
directory, no evaluation but the last, noise-scale measurement off: its split steps are priced
separately, components/study_summary.py), takes the median of 10-step means of its step-to-step
times after the first components/study.py WARM_STEPS, as a run's pace is measured, and keeps what
it costs beyond the ladder's step at the same micro-batch as `overhead_s`, which
components/study_summary.py `probe_seconds_per_step` adds per optimizer step.
"""

import copy
import time
from typing import Dict

from components import models, study, training
from components.config import parse_config, with_batch_sizes
from components.datasets import Dataset

BURST_S = 0.3  # timed steps, about (plus one validation pass at the start and one at the end)
BLOCK = 10  # steps per mean
MIN_STEPS, MAX_STEPS = 30, 1000
# A step slower than this dwarfs the loop's ~0.1 ms (under 1%): no burst, which would cost MIN_STEPS
# of those steps and two validation passes for nothing
MAX_STEP_S = 0.02


def measure(config: dict, data: Dataset, micro: int, ladder_step_s: float) -> Dict:
    """The trainer's seconds per step at `micro` (one micro-batch per step) against the ladder's
    `ladder_step_s` there: {"micro_batch_size", "steps", "seconds_per_step", "ladder_seconds_per_step",
    "overhead_s"}; overhead_s is None when too few steps ran (a run that diverged at once), or, with a
    note, when the ladder's step is slower than MAX_STEP_S and nothing was run."""
    if ladder_step_s > MAX_STEP_S:
        return {"micro_batch_size": micro, "steps": 0, "seconds_per_step": None, "ladder_seconds_per_step": ladder_step_s,
                "overhead_s": None, "note": f"not measured: a {1e3 * ladder_step_s:.0f} ms step dwarfs the loop's own cost"}
    steps = int(min(MAX_STEPS, max(MIN_STEPS, BURST_S / max(ladder_step_s, 1e-6))))
    cfg = parse_config(_burst_config(config, micro, steps))
    model = models.build_model(cfg.model, data.input_shape, data.output_dim)
    stamps = []
    trainer = training.Trainer(model, data, cfg, progress=False, on_step=lambda step: stamps.append(time.perf_counter()))
    trainer.fit()
    warm = study.WARM_STEPS  # the first steps allocate and fill the caches
    deltas = [b - a for a, b in zip(stamps[warm:], stamps[warm + 1:])]
    # as a run's pace is measured (components/study.py warm_seconds_per_step): the median of 10-step
    # means, so the stalls a shared CPU puts into a run's steps are in it too (the ladder's short-block
    # median leaves them out: it is the machine's pace, this the loop's); at least two blocks
    pace = study.block_median(deltas, BLOCK) if len(deltas) >= 2 * BLOCK else None
    return {"micro_batch_size": micro, "steps": len(stamps), "seconds_per_step": pace,
            "ladder_seconds_per_step": ladder_step_s,
            "overhead_s": None if pace is None else max(0.0, pace - ladder_step_s)}


def _burst_config(config: dict, micro: int, steps: int) -> dict:
    """The run's config for a burst: one process, `steps` steps of one `micro` micro-batch, no
    early stop, no target, one evaluation (at the end), nothing tracked."""
    raw = copy.deepcopy(with_batch_sizes(config, micro, micro))
    raw["pipeline"] = "train"  # one training run, also when the probe serves a study (which requires a target)
    raw["train"].update(max_steps=steps, max_epochs=max(raw["train"]["max_epochs"], 10_000), nproc=1,
                        track_noise_scale=False, checkpoint_every_s=None, checkpoint_every_steps=None)
    raw["eval"].update(every_steps=steps, patience=10 * steps, target=None, stop_at_target=False)
    raw["platform"] = {**raw["platform"], "gpu": {**raw["platform"]["gpu"], "count": 0}, "nodes": 1}
    raw["tracking"] = {**raw["tracking"], "mode": "disabled"}
    return raw
