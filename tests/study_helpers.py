"""Shared by the study tests: a study config, the probe decision it is planned from, a study
row as components.study writes one, and a scripted runner for the LR search (no training)."""

import math

from components import study
from pipelines.config import compose_config

PROBE = {"recommendation": {"effective_batch_size": 64}, "b_simple": 150.0, "b_simple_spread": 20.0,
         "max_micro_batch_size": 24, "device": "cpu"}


def study_config(**study_keys) -> dict:
    raw = compose_config(["pipeline=study", "run_id=s1", "tracking.mode=disabled"])
    raw["study"].update(study_keys)
    return raw


def row(batch, steps, seed=0, multiplier=1.0, best=0.96, test=0.95, n_train=1259):
    reached = steps is not None
    return {"name": study.run_name(batch, multiplier, seed), "run_dir": f"runs/{batch}", "batch_size": batch,
            "lr_multiplier": multiplier, "seed": seed, "status": "completed", "micro_batch_size": batch,
            "accumulation_steps": 1, "lr": 0.05 * batch / 32 * multiplier, "reached_target": reached,
            "steps_to_target": steps, "samples_to_target": steps * batch if reached else None,
            "epochs_to_target": steps * batch / n_train if reached else None,
            "time_to_target_s": steps * (0.001 + batch * 1e-5) if reached else None, "best_metric": best,
            "test_metric": test, "stop_reason": "target_reached" if reached else "max_epochs",
            "optimizer_steps": steps or 500, "samples_seen": (steps or 500) * batch,
            "wall_time_s": (steps or 500) * (0.001 + batch * 1e-5) + 0.5,  # 0.5 s of evaluation
            "train_time_s": (steps or 500) * (0.001 + batch * 1e-5),
            "gns_b_simple": None, "data_version": "d1"}



def scripted(steps_of):
    """A runner for study.run_batch that trains nothing: steps_of(multiplier, seed) is the step
    at which that run first meets the target (None: never, "diverged": it diverges). The row
    says what a run evaluated every `every` steps and stopped at `cap` would have measured."""
    calls = []

    def runner(entry, name, multiplier, seed, kind, every, cap, dataset_path, study_dir):
        calls.append((multiplier, seed, kind, every, cap))
        true = steps_of(multiplier, seed)
        limit = min(cap or entry["budget_steps"], entry["budget_steps"])
        out = row(entry["batch_size"], None, seed=seed, multiplier=multiplier)
        out.update(name=name, search=kind, eval_every_steps=every, step_cap=cap)
        if true == "diverged":
            out.update(status="diverged", optimizer_steps=3, divergence={"rule": "collapse", "step": 3, "lr": 1.0})
            return out
        measured = None if true is None else math.ceil(true / every) * every
        if measured is not None and measured <= limit:
            out.update(row(entry["batch_size"], measured, seed=seed, multiplier=multiplier), name=name,
                       search=kind, eval_every_steps=every, step_cap=cap)
        else:
            out.update(optimizer_steps=limit, capped=cap is not None and limit == cap)
        return out

    return runner, calls


def search(steps_of, seeds=1, confirm_seeds=0, **study_keys):
    config = study_config(batch_sizes=[64], seeds=seeds, confirm_seeds=confirm_seeds, **study_keys)
    runner, calls = scripted(steps_of)
    rows = study.run_batch(study.plan(config, 1259, PROBE)[0], "unused", "unused", runner=runner)
    return rows, calls, config
