"""Step 2: train. Trains the model on the dataset artifact with gradient accumulation and
early stopping (components/training.py), writes the best weights, metrics.jsonl and
checkpoints. Re-running with the same run directory resumes from the last checkpoint.

    python -m components.train --config config.yaml --dataset dataset/ --model-out model.pt --run-dir runs/r1 \
        [--probe probe.json]
"""

import argparse
from pathlib import Path
from typing import Optional

import torch

from components import datasets, lineage, models, storage, tracking, training
from components.config import config_hash, for_dataset, load_config_file, parse_config
from components.cpu import configure_threads
from components.errors import exit_on_user_error
from components.tracking import Tracker

MODEL_FILE = "model.pt"  # in the run directory: the best weights with their metadata


def run(config: dict, dataset_path: str, model_out: str, run_dir: str, progress: Optional[bool] = None,
        on_step=None) -> dict:
    """Train on the dataset artifact; write model.pt (the best weights) unless no evaluation was
    finite, metrics.jsonl and checkpoints into run_dir. The outcome's `status` is "completed"
    or "diverged" (then `divergence` says which rule, where, and what to try)."""
    data = datasets.load(Path(dataset_path))
    config = for_dataset(config, data.manifest)
    cfg = parse_config(config)
    configure_threads(cfg.train)
    run_dir = storage.local_path(run_dir)
    torch.manual_seed(cfg.train.seed)
    model = models.build_model(cfg.model, data.input_shape, data.output_dim)
    run_lineage = lineage.collect(cfg, data.manifest)  # W&B config, model.pt and (via evaluate) summary.json

    def start_tracker() -> Tracker:
        return Tracker(cfg.tracking, run_dir, cfg.run_id or run_dir.name, "train",
                       {**config, "data_version": data.data_version, "config_hash": config_hash(cfg),
                        "lineage": run_lineage})

    def tracker_after_training() -> Tracker:
        # Offline (and disabled) the W&B run starts after training and gets metrics.jsonl
        # replayed: its service process would otherwise compete with the training it times
        # (measured on 2 cores: steps up to 10x slower).
        after = start_tracker()
        metrics_path = run_dir / training.METRICS
        if after.run is not None and metrics_path.exists():
            tracking.replay(after, storage.read_jsonl(metrics_path))
        return after

    tracker = start_tracker() if tracking.follows_live(cfg.tracking) else None  # online: W&B follows live
    try:
        # the trainer refuses a run directory holding another run before anything is written there
        trainer = training.Trainer(model, data, cfg, run_dir, tracker, progress=progress, on_step=on_step)
        plan = trainer.plan
        progress_summary = {"run_id": cfg.run_id, "planned_steps": plan.max_steps,
                            "steps_per_epoch": plan.steps_per_epoch, "data_version": data.data_version}
        storage.write_json(run_dir / "summary.json", {**progress_summary, "status": "running"})
        result = trainer.fit()
    except BaseException:
        (tracker or tracker_after_training()).finish(failed=True)
        raise
    storage.write_json(run_dir / "summary.json", {
        **progress_summary, "status": "trained" if result.status == "completed" else result.status,
        "stop_reason": result.stop_reason, "optimizer_steps": result.optimizer_steps})
    tracker = tracker or tracker_after_training()
    outcome = {**result.to_dict(), "data_version": data.data_version, "config_hash": config_hash(cfg),
               "wandb_dir": tracker.offline_dir, "task": data.task, "lineage": run_lineage,
               "model_file": str(run_dir / MODEL_FILE) if result.best_metric["value"] is not None else None}
    tracker.summarize({k: v for k, v in outcome.items() if k not in ("best_metric", "divergence", "lineage")}
                      | {"best/" + result.best_metric["name"]: result.best_metric["value"]})
    tracker.finish(failed=result.status != "completed")

    if outcome["model_file"] is None:  # no finite evaluation: there is no best model to save
        print(f"train: no model saved: {result.divergence['detail']}", flush=True)
        return outcome
    checkpoint = {"state_dict": {k: v.cpu() for k, v in model.state_dict().items()}, "config": config,
                  "data_version": data.data_version, "config_hash": config_hash(cfg), "lineage": run_lineage,
                  "input_shape": list(data.input_shape), "output_dim": data.output_dim,
                  "best_metric": result.best_metric, "status": result.status,
                  # what a prediction needs to go from raw features to the target's own units
                  "task": data.task, "classes": data.manifest["classes"],
                  "normalization": data.manifest["normalization"],
                  "target_scale": data.manifest.get("target_scale")}
    storage.save_torch(checkpoint, run_dir / MODEL_FILE)
    storage.save_torch(checkpoint, Path(model_out))
    return outcome


def load_model(path: Path):
    """The trained model and its checkpoint metadata, from a model file written by `run`."""
    checkpoint = storage.load_torch(path)
    cfg = parse_config(checkpoint["config"])
    model = models.build_model(cfg.model, tuple(checkpoint["input_shape"]), checkpoint["output_dim"])
    model.load_state_dict(checkpoint["state_dict"])
    return model, checkpoint


@exit_on_user_error
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="resolved config (YAML or JSON)")
    parser.add_argument("--dataset", required=True, help="dataset artifact directory (from data_prep)")
    parser.add_argument("--model-out", required=True, help="where to write the best model")
    parser.add_argument("--run-dir", required=True, help="run directory: metrics, checkpoints, summary")
    parser.add_argument("--probe", help="probe.json (from the probe step) deciding 'auto' batch sizes")
    args = parser.parse_args(argv)
    config = load_config_file(args.config)
    if args.probe:
        from components import probe

        config = probe.apply(config, storage.read_json(args.probe))
    outcome = run(config, args.dataset, args.model_out, args.run_dir)
    storage.write_json(Path(args.run_dir) / "train_result.json", outcome)


if __name__ == "__main__":
    main()
