"""Step 3: evaluate. Test metrics of the restored best model, the run's summary.json, and the
seal: the manifest over everything the run's steps stored, written last, after which the run is
visible (components/run_store.py). promote (components/promote.py), when it follows, seals it again.

    python -m components.evaluate --config config.yaml --dataset dataset/ --model model.pt \
        --train-result runs/r1/train_result.json --run-dir runs/r1 [--probe probe.json]
"""

import argparse
import sys
from pathlib import Path
from typing import Optional

import torch

from components import datasets, metrics, run_store, storage
from components.config import for_dataset, load_config_file, parse_config
from components.errors import DataError, exit_on_user_error
from components.run_record import SUMMARY_FILE, RunRecord
from components.tracking import Tracker


def run(config: dict, dataset_path: str, model_path: str, train_result: dict, store=None,
        probe_decision: Optional[dict] = None) -> dict:
    """Test the trained model; store the run's summary.json and seal the run. `store`: the run's
    RunStore or location (None: `<output_dir>/<run_id>` of the config). A run with no finite
    evaluation has no model: its summary says so (status diverged, test {}), and nothing is loaded."""
    from components.train import load_model

    data = datasets.load(Path(dataset_path))
    config = for_dataset(config, data.manifest)
    cfg = parse_config(config)
    store = run_store.open_run(config, store)
    r = train_result
    test = {}
    if r["best_metric"]["value"] is None:
        print(f"evaluate: no model to test: no evaluation of the run was finite ({r['divergence']['detail']})",
              flush=True)
    else:
        model, checkpoint = load_model(Path(model_path))
        if checkpoint["data_version"] != data.data_version:
            raise DataError(f"evaluate: the model was trained on data {checkpoint['data_version']}, "
                            f"not on this dataset ({data.data_version})")
        x_test, y_test = (torch.as_tensor(a) for a in data.split("test"))
        test = metrics.evaluate(model, x_test, y_test, data.task, data.manifest["n_classes"] or 0,
                                prefix="test", full=True, target_scale=data.manifest.get("target_scale"))

    record = RunRecord.from_training(r, cfg.run_id, cfg.train.optimizer, cfg.eval.target, data.manifest, test,
                                     probe_decision)
    summary = {**record.to_dict(), "lineage": r["lineage"]}  # train's (components/lineage.py), as in model.pt
    run_id = cfg.run_id or Path(store.uri).name
    with storage.scratch_dir(f"evaluate-{run_id}-") as scratch:
        storage.write_json(scratch / SUMMARY_FILE, summary)
        tracker = Tracker(cfg.tracking, scratch, run_id, "evaluate",
                          {**config, "data_version": data.data_version, "lineage": r["lineage"]})
        tracker.summarize({k: v for k, v in test.items() if k != "test/confusion_matrix"} | {"status": r["status"]})
        tracker.finish(failed=r["status"] != "completed")
        store.sync(scratch, [SUMMARY_FILE, *run_store.local_files(scratch, "wandb")])
    store.seal(manifest_extra(summary))
    return summary


def manifest_extra(summary: dict) -> dict:
    """What a run's manifest says besides its files: enough to list runs without opening them."""
    return {"kind": "run", "run_id": summary["run_id"], "status": summary["status"],
            "data_version": summary["data_version"], "config_hash": summary["config_hash"],
            "lineage": summary["lineage"]}


@exit_on_user_error
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="resolved config (YAML or JSON)")
    parser.add_argument("--dataset", required=True, help="dataset artifact directory (from data_prep)")
    parser.add_argument("--model", required=True, help="model file (from train)")
    parser.add_argument("--train-result", required=True, help="train_result.json (from train)")
    parser.add_argument("--run-dir", required=True, help="the run's store (a directory or s3://)")
    parser.add_argument("--probe", help="probe.json, if the probe step ran")
    args = parser.parse_args(argv)
    from components import probe

    decision = probe.decision(storage.read_json(args.probe)) if args.probe else None
    summary = run(load_config_file(args.config), args.dataset, args.model, storage.read_json(args.train_result),
                  args.run_dir, decision)
    if summary["status"] == "diverged":  # not a result: say so and exit non-zero
        print(f"evaluate: {RunRecord.from_dict(summary).divergence_line()}", file=sys.stderr)
        raise SystemExit(3)


if __name__ == "__main__":
    main()
