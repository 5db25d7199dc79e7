"""Step 2: train. Trains the model on the dataset artifact with gradient accumulation and
early stopping (components/training.py) in its own scratch directory, and keeps the run's files
in its store (`<output_dir>/<run_id>/`, local or s3://, components/run_store.py):
metrics.jsonl and checkpoints/last.pt at every checkpoint, then model.pt and the W&B offline
run at the end. A run whose store holds a checkpoint resumes from it (a KFP retry, a preempted
pod, a second submit with the same run_id); `resume_from` names another run to start from.

With a world size above 1 (train.nproc, or a pod's GPUs) the step runs its training under
torchrun (components/launch.py); every rank runs `run`, and only rank 0 writes: the store,
the progress note, W&B and model.pt. Under a launcher that is already there (a Kubeflow
TrainJob's torchrun), `run` is that rank directly.

    python -m components.train --config config.yaml --dataset dataset/ --model-out model.pt --run-dir runs/r1 \
        [--probe probe.json] [--storage '{"endpoint_url": "http://minio:9000"}']

--config, --dataset and --probe may be s3:// URIs (a Kubeflow TrainJob's pods get no KFP
artifacts: components/trainjob.py); --storage says how to reach them (the config's storage.*).
"""

import argparse
import json
from pathlib import Path
from typing import Optional

import torch

from components import datasets, distributed, launch, lineage, models, run_store, storage, tracking, training
from components.config import StorageConfig, config_hash, for_dataset, load_config_file, parse_config
from components.cpu import configure_threads
from components.errors import ConfigError, StorageError, exit_on_user_error
from components.run_record import SUMMARY_FILE
from components.run_store import RunStore, join_uri
from components.tracking import Tracker
from components.train_outputs import MODEL_FILE, RESULT_FILE

PROGRESS = [training.METRICS, training.CHECKPOINT]  # synced in this order: the rows never fall behind a checkpoint


def run(config: dict, dataset_path: str, model_out: str, store=None, progress: Optional[bool] = None,
        on_step=None) -> dict:
    """Train on the dataset artifact; write model.pt (the best weights, to `model_out` and the
    store) unless no evaluation was finite. `store`: the run's RunStore or location (a local
    path or s3://); None: `<output_dir>/<run_id>` of the config. The outcome's `status` is
    "completed" or "diverged" (then `divergence` says which rule, where, and what to try).
    `on_step` runs in this process: not with several ranks."""
    data = datasets.load(Path(dataset_path))
    config = for_dataset(config, data.manifest)
    cfg = parse_config(config)
    if cfg.world_size > 1 and not launch.under_launcher():
        if on_step is not None:
            raise ValueError("on_step: the ranks run in other processes; call run() with train.nproc=1")
        training.Plan.make(cfg, data.manifest["counts"]["train"])  # its one-line errors before any process starts
        return launch.train_across_ranks(cfg, config, dataset_path, model_out,
                                         store.uri if isinstance(store, RunStore) else store, progress)
    main = distributed.runtime_from_env()[0] == 0  # rank 0 writes; the others only train
    configure_threads(cfg.train)
    store = run_store.open_run(config, store)
    run_id = cfg.run_id or Path(store.uri).name
    torch.manual_seed(cfg.train.seed)
    model = models.build_model(cfg.model, data.input_shape, data.output_dim)
    run_lineage = lineage.collect(cfg, data.manifest)  # W&B config, model.pt and (via evaluate) summary.json
    identity = {"config_hash": config_hash(cfg), "data_version": data.data_version}

    with storage.scratch_dir(f"train-{run_id}-") as scratch:
        resumed = restore_checkpoint(store, cfg, identity, scratch)  # every rank: its own copy
        if not main:
            trainer = training.Trainer(model, data, cfg, scratch, progress=False)
            return {**trainer.fit().to_dict(), **identity}
        if resumed:
            print(f"train: resuming from {resumed}", flush=True)
        store.unpublish()  # its files are about to change: not visible until evaluate seals it again

        def start_tracker() -> Tracker:
            return Tracker(cfg.tracking, scratch, run_id, "train",
                           {**config, "data_version": data.data_version, "config_hash": identity["config_hash"],
                            "lineage": run_lineage})

        def tracker_after_training() -> Tracker:
            # Offline (and disabled) the W&B run starts after training and gets metrics.jsonl
            # replayed: its service process would otherwise compete with the training it times
            # (measured on 2 cores: steps up to 10x slower).
            after = start_tracker()
            metrics_path = scratch / training.METRICS
            if after.run is not None and metrics_path.exists():
                tracking.replay(after, storage.read_jsonl(metrics_path))
            return after

        def note(status: str, **more) -> None:  # the progress note readers follow (pipelines/progress.py)
            storage.write_json(scratch / SUMMARY_FILE, {**progress_summary, "status": status, **more})
            store.sync(scratch, [SUMMARY_FILE, *(k for k in PROGRESS if (scratch / k).exists())])

        tracker = start_tracker() if tracking.follows_live(cfg.tracking) else None  # online: W&B follows live
        try:
            trainer = training.Trainer(model, data, cfg, scratch, tracker, progress=progress, on_step=on_step,
                                       on_checkpoint=lambda: store.sync(scratch, PROGRESS))
            plan = trainer.plan
            progress_summary = {"run_id": cfg.run_id, "planned_steps": plan.max_steps,
                                "steps_per_epoch": plan.steps_per_epoch, "data_version": data.data_version}
            note("running")
            result = trainer.fit()
        except BaseException:
            (tracker or tracker_after_training()).finish(failed=True)
            raise
        tracker = tracker or tracker_after_training()
        outcome = {**result.to_dict(), "data_version": data.data_version, "config_hash": identity["config_hash"],
                   "wandb_dir": tracker.offline_dir and join_uri(store.uri, Path(tracker.offline_dir)
                                                                 .relative_to(scratch).as_posix()),
                   "task": data.task, "lineage": run_lineage,
                   "model_file": join_uri(store.uri, MODEL_FILE) if result.best_metric["value"] is not None else None}
        tracker.summarize({k: v for k, v in outcome.items() if k not in ("best_metric", "divergence", "lineage")}
                          | {"best/" + result.best_metric["name"]: result.best_metric["value"]})
        tracker.finish(failed=result.status != "completed")
        store.sync(scratch, run_store.local_files(scratch, "wandb"))

        if outcome["model_file"] is None:  # no finite evaluation: there is no best model to save
            print(f"train: no model saved: {result.divergence['detail']}", flush=True)
        else:
            save_model(model, config, cfg, data, identity, run_lineage, result, Path(model_out))
            store.put_file(Path(model_out), MODEL_FILE)
        note("trained" if result.status == "completed" else result.status, stop_reason=result.stop_reason,
             optimizer_steps=result.optimizer_steps)
    return outcome


def restore_checkpoint(store: RunStore, cfg, identity: dict, scratch: Path) -> Optional[str]:
    """Copy the run's synced checkpoint and metrics.jsonl into scratch (the Trainer resumes from
    a local checkpoint), else resume_from's; the location it came from, or None for a new run."""
    sources = [("run_id", store)]
    if cfg.resume_from:
        sources.append(("resume_from", RunStore.open(cfg.resume_from, store.settings)))
    for key, source in sources:
        if not source.exists(training.CHECKPOINT):
            continue
        where = join_uri(source.uri, training.CHECKPOINT)
        if not source.exists(training.METRICS):
            raise StorageError(f"{where}: stored without its metrics.jsonl; the run cannot resume from it, "
                               f"choose another {key}")
        source.get_file(training.METRICS, scratch / training.METRICS)
        source.get_file(training.CHECKPOINT, scratch / training.CHECKPOINT)
        # mmap: only what is read here leaves the disk (the Trainer loads the whole checkpoint)
        checkpoint = torch.load(scratch / training.CHECKPOINT, map_location="cpu", weights_only=False, mmap=True)
        for name, value in identity.items():  # the hash is the versioned one: no paths of either machine
            if checkpoint[name] != value:
                raise ConfigError(f"{key}: {source.uri} holds a run with a different {name} "
                                  f"({checkpoint[name]} != {value}); it cannot be resumed with this config and data")
        if (scratch / training.METRICS).stat().st_size < checkpoint["metrics_offset"]:
            raise StorageError(f"{where}: its metrics.jsonl is shorter than the checkpoint's rows; the stored copy "
                               f"is incomplete, choose another {key}")
        return source.uri
    return None


def save_model(model, config: dict, cfg, data, identity: dict, run_lineage: dict, result, path: Path) -> None:
    checkpoint = {"state_dict": {k: v.cpu() for k, v in model.state_dict().items()}, "config": config,
                  "data_version": data.data_version, "config_hash": identity["config_hash"], "lineage": run_lineage,
                  "input_shape": list(data.input_shape), "output_dim": data.output_dim,
                  "best_metric": result.best_metric, "status": result.status,
                  # what a prediction needs to go from raw features to the target's own units
                  "task": data.task, "classes": data.manifest["classes"],
                  "normalization": data.manifest["normalization"],
                  "target_scale": data.manifest.get("target_scale")}
    storage.save_torch(checkpoint, path)


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
    parser.add_argument("--run-dir", required=True, help="the run's store (a directory or s3://): metrics, "
                                                         "checkpoints, summary")
    parser.add_argument("--probe", help="probe.json (from the probe step) deciding 'auto' batch sizes")
    parser.add_argument("--storage", help="storage settings (JSON, the config's storage.*) for s3:// inputs")
    args = parser.parse_args(argv)
    settings = StorageConfig(**json.loads(args.storage)) if args.storage else None
    with storage.scratch_dir("train-inputs-") as inputs:
        config = load_config_file(fetch_input(args.config, inputs / "config", settings))
        if args.probe:
            from components import probe

            config = probe.apply(config, storage.read_json(Path(fetch_input(args.probe, inputs / "probe", settings))))
        dataset = fetch_input(args.dataset, inputs / "dataset", settings, directory=True)
        outcome = run(config, dataset, args.model_out, args.run_dir)
    if distributed.runtime_from_env()[0] == 0:  # under a TrainJob's torchrun every rank gets here
        run_store.open_run(config, args.run_dir).put_json(RESULT_FILE, outcome)


def fetch_input(uri: str, local: Path, settings=None, directory: bool = False) -> str:
    """A local path as it is; an s3:// file or directory (every key under it) copied to `local`."""
    if not run_store.is_remote(uri):
        return uri
    if directory:
        source = RunStore.open(uri, settings)
        keys = source.list()
        if not keys:
            raise StorageError(f"{uri}: no files there; check the URI")
        for key in keys:
            source.get_file(key, local / key)
        return str(local)
    parent, _, name = uri.rstrip("/").rpartition("/")
    RunStore.open(parent, settings).get_file(name, local)
    return str(local)


if __name__ == "__main__":
    main()
