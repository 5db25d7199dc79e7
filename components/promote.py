"""Step 4: promote (champion/challenger), after evaluate. The new model (the challenger) replaces
the champion in the registry (components/registry.py) only when it is better on the same test data.

Decision, on the monitored metric (eval.monitor's name on the test split, towards eval.mode):
- a run that did not complete (diverged, failed) or has no finite test metric: never promoted;
- no champion yet: promoted;
- otherwise improvement = challenger - champion (max) or champion - challenger (min), and the
  challenger is promoted iff improvement > 0 and improvement >= registry.min_improvement (a tie
  keeps the champion). The champion's number is the one recorded when it was promoted if that
  was on the same test data version (and metric); otherwise its model is re-scored on this test
  split first, exactly as evaluate scores the challenger. A champion that cannot score this data
  at all (another task, input shape or set of classes) is replaced.
The decision and its reason go to the registry's history (with the run's W&B group and time to
target), W&B (the promote run's summary, the model as an artifact, the "champion" alias on
promotion) and the returned dict (summary.json's "promotion"). Then the W&B Report of the group's
history is created or updated (components/wandb_review.py; tracking.mode=online with
WANDB_API_KEY, else skipped in one line) and its URL printed and returned as "wandb_report".

    python -m components.promote --config config.yaml --summary summary.json --model model.pt \
        --dataset dataset/ --run-dir runs/r1 [--out promotion.json]

`publish` then puts the decision into the run's summary.json ("promotion") and seals the run again.
"""

import argparse
import hashlib
import math
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch

from components import datasets, metrics, run_store, storage, wandb_review
from components.config import for_dataset, load_config_file, parse_config
from components.errors import DataError, StorageError, exit_on_user_error
from components.evaluate import manifest_extra
from components.registry import Registry
from components.run_record import SUMMARY_FILE
from components.run_store import RunStore, join_uri
from components.tracking import Tracker, group_of
from components.train import MODEL_FILE, load_model

REL_TOL = 1e-9  # k/n accuracies read back from floats can land an ulp under min_improvement
CHAMPION_ALIAS = "champion"


def registry_uri(cfg) -> str:
    return cfg.registry.uri or join_uri(cfg.output_dir, "registry")


def run(config: dict, summary: dict, model_path: str, dataset_path: str, store=None,
        reports: Optional[wandb_review.WandbReports] = None) -> dict:
    """Decide on the run whose evaluate step wrote `summary` (its model at model_path, its store
    `store`: a RunStore or location, None: `<output_dir>/<run_id>`) and record the decision.
    Returns it, with the registry's URI, its number in the history and the W&B Report's URL
    (None when none was saved). `reports`: where the report is saved (W&B's server by default)."""
    data = datasets.load(Path(dataset_path))
    config = for_dataset(config, data.manifest)
    cfg = parse_config(config)
    store = run_store.open_run(config, store)
    run_id = summary["run_id"] or Path(store.uri).name
    if summary.get("data_version") != data.data_version:
        raise DataError(f"promote: run {run_id} was tested on data {summary.get('data_version')}, not on this "
                        f"dataset ({data.data_version}); pass the dataset its evaluate step used")
    metric, mode = cfg.eval.monitor.split("/", 1)[1], cfg.eval.mode
    refusal = ineligible(summary, run_id, metric)
    candidate = None if refusal else challenger(summary, run_id, store, Path(model_path), metric, mode,
                                                data.data_version)
    rescored: Dict[str, dict] = {}  # champion model sha256 -> its test metrics here (a lost race asks again)

    def decide(champion: Optional[dict]) -> dict:
        base = {"run_id": run_id, "metric": f"test/{metric}", "mode": mode, "value": summary["test"].get(metric),
                "data_version": data.data_version, "min_improvement": cfg.registry.min_improvement,
                "champion": None, "improvement": None, "time_to_target_s": summary.get("time_to_target_s"),
                "wandb_group": group_of(cfg.tracking, run_id)}  # the last two: the group's W&B report
        if refusal:
            return {**base, "promoted": False, "reason": refusal}
        if champion is None:
            return {**base, "promoted": True, "reason": f"run {run_id} promoted: no champion yet "
                                                        f"(test/{metric} {candidate['value']:.6g}, test data {data.data_version})"}
        return {**base, **against(candidate, champion, data, cfg, rescored)}

    registry = Registry.open(registry_uri(cfg), cfg.storage)
    entry = registry.promote(candidate, decide)
    result = {**entry["decision"], "seq": entry["seq"], "registry": registry_uri(cfg)}
    track(cfg, config, run_id, result, candidate, store, data.data_version)
    result["wandb_report"], line = wandb_review.review(cfg, registry, reports)
    if line:
        print(f"promote: {line}", flush=True)
    print(f"promote: {result['reason']}", flush=True)  # last: the step's status line (pipelines/progress.py)
    return result


def publish(summary: dict, result: dict, store: RunStore) -> dict:
    """summary.json with the decision as "promotion", and the run sealed again (evaluate sealed it
    before promote added its W&B files): the manifest lists every file. Returns the new summary."""
    summary = {**summary, "promotion": result}
    with storage.scratch_dir(f"promote-{result['run_id']}-") as scratch:
        storage.write_json(scratch / SUMMARY_FILE, summary)
        store.put_file(scratch / SUMMARY_FILE, SUMMARY_FILE)
    store.seal(manifest_extra(summary))
    return summary


def ineligible(summary: dict, run_id: str, metric: str) -> Optional[str]:
    """Why the run can never be promoted, or None."""
    if summary["status"] != "completed":
        return f"run {run_id} not promoted: status {summary['status']} (only a completed run is ever promoted)"
    value = summary["test"].get(metric)
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return f"run {run_id} not promoted: no finite test/{metric} (no model was tested)"
    return None


def challenger(summary: dict, run_id: str, store: RunStore, model_path: Path, metric: str, mode: str,
               data_version: str) -> dict:
    """The champion record the run would become: its published model, checked to be model_path."""
    manifest = store.read_manifest()
    if manifest is None:
        raise StorageError(f"{store.uri}: not published (no manifest); promote runs after evaluate has sealed the run")
    published = manifest["files"].get(MODEL_FILE, {}).get("sha256")
    sha256 = storage.sha256_file(model_path)
    if published != sha256:
        raise StorageError(f"{join_uri(store.uri, MODEL_FILE)}: the run's published model is not {model_path} "
                           f"(sha256 {published} != {sha256}); pass the model of run {run_id}")
    # a local run by its absolute path: a later step may run elsewhere on this machine
    run_uri = store.uri if run_store.is_remote(store.uri) else str(storage.local_path(store.uri).resolve())
    return {"run_id": run_id, "run_uri": run_uri, "model_uri": join_uri(run_uri, MODEL_FILE),
            "model_sha256": sha256, "metric": metric, "mode": mode, "value": summary["test"][metric],
            "test": {k: v for k, v in summary["test"].items() if k != "confusion_matrix"},
            "test_data_version": data_version, "config_hash": summary.get("config_hash")}


def against(candidate: dict, champion: dict, data, cfg, rescored: Dict[str, dict]) -> dict:
    """The decision's fields when there is a champion: the numbers compared and the verdict."""
    metric, mode, run_id, version = candidate["metric"], candidate["mode"], candidate["run_id"], data.data_version
    same_data = champion["test_data_version"] == version and metric in champion["test"]
    about = {"run_id": champion["run_id"], "recorded_value": champion["test"].get(metric),
             "recorded_data_version": champion["test_data_version"], "rescored": not same_data}
    if champion["model_sha256"] == candidate["model_sha256"]:
        return {"promoted": False, "champion": {**about, "value": candidate["value"], "rescored": False},
                "improvement": 0.0,
                "reason": f"run {run_id} is the champion already"}
    if same_data:
        old = champion["test"][metric]
    else:
        if champion["model_sha256"] not in rescored:
            rescored[champion["model_sha256"]] = rescore(champion, data, cfg.storage)
        scores = rescored[champion["model_sha256"]]
        if "incomparable" in scores:
            return {"promoted": True, "champion": about,
                    "reason": f"run {run_id} promoted: champion {champion['run_id']} cannot score test data "
                              f"{version} ({scores['incomparable']})"}
        old = scores[metric]
    new, min_improvement = candidate["value"], cfg.registry.min_improvement
    improvement = new - old if mode == "max" else old - new
    promoted = improvement > 0 and improvement >= min_improvement * (1 - REL_TOL)
    numbers = (f"test/{metric} {new:.6g} vs champion {champion['run_id']}'s {old:.6g}"
               f"{' (re-scored on this data)' if not same_data else ''}, improvement {improvement:.6g} ({mode})")
    if promoted:
        reason = f"run {run_id} promoted: {numbers} >= min_improvement {min_improvement:g}, test data {version}"
    else:
        short = "not > 0" if improvement <= 0 else f"< min_improvement {min_improvement:g}"
        reason = f"champion {champion['run_id']} kept: {numbers} {short}, test data {version}"
    return {"promoted": promoted, "champion": {**about, "value": old}, "improvement": improvement, "reason": reason}


def rescore(champion: dict, data, settings) -> dict:
    """The champion's test metrics on this dataset, or {"incomparable": why}."""
    where = f"promote: cannot re-score champion {champion['run_id']} on test data {data.data_version}"
    model_key = champion["model_uri"][len(champion["run_uri"]):].lstrip("/")
    try:
        blob = RunStore.open(champion["run_uri"], settings).read_published(model_key)
    except StorageError as exc:
        raise StorageError(f"{where}: {exc}") from None
    if hashlib.sha256(blob).hexdigest() != champion["model_sha256"]:
        raise StorageError(f"{where}: {champion['model_uri']} is not the model promoted (sha256 changed since); "
                           "restore that run's model.pt")
    with storage.scratch_dir("promote-champion-") as scratch:
        (scratch / MODEL_FILE).write_bytes(blob)
        model, checkpoint = load_model(scratch / MODEL_FILE)
    why = incomparable(checkpoint, data)
    return {"incomparable": why} if why else score(model, checkpoint, data)


def incomparable(checkpoint: dict, data) -> Optional[str]:
    m = data.manifest
    if checkpoint["task"] != data.task:
        return f"it is a {checkpoint['task']} model, the data is {data.task}"
    if tuple(checkpoint["input_shape"]) != data.input_shape:
        return f"it takes inputs of shape {tuple(checkpoint['input_shape'])}, the data has {data.input_shape}"
    if data.task == "classification" and sorted(map(str, checkpoint["classes"])) != sorted(map(str, m["classes"])):
        return f"its classes {checkpoint['classes']} are not the data's {m['classes']}"
    return None


def score(model, checkpoint: dict, data) -> dict:
    """A saved model's metrics on the dataset's test split, as evaluate computes a new model's:
    the features put back into the model's own normalization, its outputs into the dataset's
    class order (classification) or standardized target (regression)."""
    m = data.manifest
    x, y = data.split("test")
    out = metrics.predict(model, torch.as_tensor(renormalize(x, m["normalization"], checkpoint["normalization"])))
    y = torch.as_tensor(y)
    if data.task == "classification":
        index = {str(c): i for i, c in enumerate(checkpoint["classes"])}
        order = [index[str(c)] for c in m["classes"]]  # the data's class j is the model's output order[j]
        return metrics.classification(out[:, order], y, m["n_classes"])
    pred = metrics.to_original_units(out.reshape(-1).double(), checkpoint["target_scale"])
    scale = m["target_scale"]
    return metrics.regression((pred - scale["mean"]) / scale["std"], y, scale)


def renormalize(x: np.ndarray, now: dict, then: dict) -> np.ndarray:
    """Features normalized by `now` (the dataset's train split) as `then` (the model's) would have them."""
    if now == then:
        return x
    flat = x.reshape(len(x), -1).astype(np.float64)
    raw = flat * np.asarray(now["std"]) + np.asarray(now["mean"])
    return ((raw - np.asarray(then["mean"])) / np.asarray(then["std"])).astype(np.float32).reshape(x.shape)


def track(cfg, config: dict, run_id: str, result: dict, candidate: Optional[dict], store: RunStore,
          data_version: str) -> None:
    """The decision in W&B (job type promote, in the run's group): in the run's summary, and the
    model as an artifact (a reference to the run's model.pt: nothing is uploaded twice, and offline
    nothing needs a server) whose "champion" alias moves to it on promotion (W&B keeps an alias on
    one version)."""
    with storage.scratch_dir(f"promote-{run_id}-") as scratch:
        tracker = Tracker(cfg.tracking, scratch, run_id, "promote", {**config, "data_version": data_version})
        if tracker.run is not None and candidate is not None:
            import wandb

            artifact = wandb.Artifact(cfg.registry.wandb_artifact, type="model",
                                      metadata={**{k: v for k, v in candidate.items() if k != "test"},
                                                **{f"test/{k}": v for k, v in candidate["test"].items()}})
            artifact.add_reference(reference(candidate["model_uri"]), name=MODEL_FILE, checksum=False)
            tracker.run.log_artifact(artifact, aliases=[run_id, CHAMPION_ALIAS] if result["promoted"] else [run_id])
        tracker.summarize(wandb_review.promote_summary(result))  # what the group's report plots
        tracker.finish()  # waits until the run's files are written (Tracker.finish)
        store.sync(scratch, run_store.local_files(scratch, "wandb"))


def reference(uri: str) -> str:
    """A W&B reference URI: s3:// as is, a local path as file://."""
    return uri if run_store.is_remote(uri) or uri.startswith("file://") else Path(uri).resolve().as_uri()


@exit_on_user_error
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="resolved config (YAML or JSON)")
    parser.add_argument("--summary", required=True, help="the run's summary.json (from evaluate)")
    parser.add_argument("--model", required=True, help="model file (from train); unread for a run that did not complete")
    parser.add_argument("--dataset", required=True, help="dataset artifact directory (from data_prep)")
    parser.add_argument("--run-dir", required=True, help="the run's store (a directory or s3://)")
    parser.add_argument("--out", help="where to write the decision (JSON), also summary.json's 'promotion'")
    args = parser.parse_args(argv)
    config, summary = load_config_file(args.config), storage.read_json(args.summary)
    store = run_store.open_run(config, args.run_dir)
    result = run(config, summary, args.model, args.dataset, store)
    publish(summary, result, store)
    if args.out:
        storage.write_json(Path(args.out), result)


if __name__ == "__main__":
    main()
