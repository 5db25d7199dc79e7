"""Step 3: evaluate. Test metrics of the restored best model, and the run's summary.json.

    python -m components.evaluate --config config.yaml --dataset dataset/ --model model.pt \
        --train-result runs/r1/train_result.json --run-dir runs/r1 [--probe probe.json]
"""

import argparse
from pathlib import Path
from typing import Optional

import torch

from components import datasets, metrics, storage
from components.config import load_config_file, parse_config
from components.errors import DataError, exit_on_user_error
from components.tracking import Tracker


def run(config: dict, dataset_path: str, model_path: str, train_result: dict, run_dir: str,
        probe_decision: Optional[dict] = None) -> dict:
    from components.train import load_model

    cfg = parse_config(config)
    run_dir = storage.local_path(run_dir)
    data = datasets.load(Path(dataset_path))
    model, checkpoint = load_model(Path(model_path))
    if checkpoint["data_version"] != data.data_version:
        raise DataError(f"evaluate: the model was trained on data {checkpoint['data_version']}, "
                        f"not on this dataset ({data.data_version})")
    x_test, y_test = (torch.as_tensor(a) for a in data.split("test"))
    test = metrics.evaluate(model, x_test, y_test, data.task, data.manifest["n_classes"] or 0,
                            prefix="test", full=True)

    r = train_result
    summary = {
        "run_id": cfg.run_id, "status": "completed", "stop_reason": r["stop_reason"],
        "effective_batch_size": r["effective_batch_size"], "micro_batch_size": r["micro_batch_size"],
        "accumulation_steps": r["accumulation_steps"], "world_size": r["world_size"],
        "lr": r["lr"], "optimizer": cfg.train.optimizer, "optimizer_steps": r["optimizer_steps"],
        "epochs": r["epochs"], "samples_seen": r["samples_seen"], "wall_time_s": r["wall_time_s"],
        "best_metric": r["best_metric"], "test": {k.removeprefix("test/"): v for k, v in test.items()},
        "steps_to_target": r["steps_to_target"], "samples_to_target": r["samples_to_target"],
        "time_to_target_s": r["time_to_target_s"], "target": cfg.eval.target,
        "train_time_to_target_s": r.get("train_time_to_target_s"), "eval_time_s": r.get("eval_time_s"),
        "resumed_from_step": r["resumed_from_step"], "steps_per_epoch": r["steps_per_epoch"],
        "data_version": data.data_version, "config_hash": r["config_hash"],
        "counts": data.manifest["counts"], "wandb_dir": r.get("wandb_dir"),
        "oom_events": r.get("oom_events", []), "gns_b_simple": r.get("gns_b_simple"),
        "probe": probe_decision,  # what the probe chose and why; null when it did not run
    }
    storage.write_json(run_dir / "summary.json", summary)

    tracker = Tracker(cfg.tracking, run_dir, cfg.run_id or run_dir.name, "evaluate",
                      {**config, "data_version": data.data_version})
    tracker.summarize({k: v for k, v in test.items() if k != "test/confusion_matrix"})
    tracker.finish()
    return summary


@exit_on_user_error
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="resolved config (YAML or JSON)")
    parser.add_argument("--dataset", required=True, help="dataset artifact directory (from data_prep)")
    parser.add_argument("--model", required=True, help="model file (from train)")
    parser.add_argument("--train-result", required=True, help="train_result.json (from train)")
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--probe", help="probe.json, if the probe step ran")
    args = parser.parse_args(argv)
    from components import probe

    decision = probe.decision(storage.read_json(args.probe)) if args.probe else None
    run(load_config_file(args.config), args.dataset, args.model, storage.read_json(args.train_result), args.run_dir,
        decision)


if __name__ == "__main__":
    main()
