"""Thin KFP component wrappers: each calls one `components.<step>.run` and moves typed
artifacts in and out. Imports live inside the bodies because KFP ships each function's
source alone into its container; the image (Dockerfile) has this package installed.

A step that keeps files gets `job_id`, KFP's id of the pipeline run (pipelines/graph.py passes
its run-time placeholder): the run id when the config names none (components.config.with_run_id).
Its files go to the run's store, `<output_dir>/<run_id>/` (components/run_store.py), and
nothing else passes between steps but artifacts and parameters. Each step notes that it started,
ended or failed (and why) beside the run, for the exit handler, finalize (components/finalize.py)."""

import functools
from types import SimpleNamespace
from typing import List, NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output


def resolve_data(config_json: str, compiled: str, job_id: str, run_id: str, data_path: str, data_repo: str,
                 data_rev: str, target: str, batch_size: str, micro_batch_size: str) -> NamedTuple(
        "Resolved", [("config_json", str), ("data_source", str), ("batch_size", int), ("micro_batch_size", int)]):
    """The run's config: the typed parameters over config_json, checked (components/run_parameters.py),
    which every later step reads; the data's source and version (a DVC md5, a sha256, an S3
    version), resolved on every run; the config's batch sizes as numbers (0: 'auto', the probe's)."""
    import json
    from collections import namedtuple

    from components import data_sources, finalize, run_parameters
    from components.errors import user_errors_as_one_line

    values = dict(run_id=run_id, data_path=data_path, data_repo=data_repo, data_rev=data_rev, target=target,
                  batch_size=batch_size, micro_batch_size=micro_batch_size)
    where = finalize.run_config(config_json, run_id, job_id)
    with user_errors_as_one_line(), finalize.recorded(where, "resolve_data") as note:
        config = run_parameters.merge(config_json, values, json.loads(compiled))
        resolved = data_sources.resolve(config)
        merged, source = json.dumps(config), json.dumps(resolved)
        note["input_notes"] = {"data_prep": finalize.input_note_key("data_prep", merged, source)}
    print(f"resolve_data: {data_sources.describe(resolved)}: version {resolved['version']}", flush=True)
    sizes = [0 if config["train"][k] == "auto" else config["train"][k] for k in ("batch_size", "micro_batch_size")]
    outputs = namedtuple("Resolved", ["config_json", "data_source", "batch_size", "micro_batch_size"])
    return outputs(merged, source, *sizes)


def data_prep(config_json: str, data_source: str, dataset: Output[Dataset]):
    """`data_source` (from resolve_data) is part of this step's cache key: new data, new dataset."""
    import json

    from components import data_prep, finalize
    from components.errors import user_errors_as_one_line

    config = json.loads(config_json)
    with user_errors_as_one_line(), finalize.recorded_by_inputs(config, "data_prep", config_json, data_source):
        manifest = data_prep.run(config, dataset.path, json.loads(data_source))
    dataset.metadata.update({"data_version": manifest["data_version"], "counts": manifest["counts"],
                             "task": manifest["task"]})


def probe(config_json: str, job_id: str, dataset: Input[Dataset], report: Output[Artifact]) -> NamedTuple(
        "ProbeDecision", [("batch_size", int), ("micro_batch_size", int), ("decision", str)]):
    import json
    import math
    from collections import namedtuple

    from components import finalize, probe
    from components.config import with_run_id
    from components.errors import user_errors_as_one_line

    config = with_run_id(json.loads(config_json), job_id)
    with user_errors_as_one_line(), finalize.recorded(config, "probe"):
        result = probe.run(config, dataset.path, report.path)
    choice = result["recommendation"]
    report.metadata.update({k: v for k, v in choice.items() if isinstance(v, (int, float)) and math.isfinite(v)})
    outputs = namedtuple("ProbeDecision", ["batch_size", "micro_batch_size", "decision"])
    return outputs(choice["effective_batch_size"], choice["micro_batch_size"], json.dumps(probe.decision(result)))


def train(config_json: str, job_id: str, batch_size: int, micro_batch_size: int, dataset: Input[Dataset],
          model: Output[Model], metrics: Output[Metrics]) -> str:
    import json

    from components import finalize, train, train_outputs
    from components.config import with_batch_sizes, with_run_id
    from components.errors import user_errors_as_one_line

    config = with_batch_sizes(with_run_id(json.loads(config_json), job_id), batch_size, micro_batch_size)
    with user_errors_as_one_line(), finalize.recorded(config, "train"):
        outcome = train.run(config, dataset.path, model.path)
    return train_outputs.hand_on(outcome, model, metrics)


def train_job(config_json: str, job_id: str, batch_size: int, micro_batch_size: int, dataset: Input[Dataset],
              model: Output[Model], metrics: Output[Metrics]) -> str:
    """train's place with platform.nodes > 1: a light pod that trains as a Kubeflow Trainer TrainJob
    and hands on exactly train's outputs (components/trainjob_launch.py)."""
    import json

    from components import finalize, train_outputs, trainjob_launch
    from components.config import with_batch_sizes, with_run_id
    from components.errors import user_errors_as_one_line

    config = with_batch_sizes(with_run_id(json.loads(config_json), job_id), batch_size, micro_batch_size)
    with user_errors_as_one_line(), finalize.recorded(config, "train_job"):
        outcome = trainjob_launch.run(config, dataset.path, model.path)
    return train_outputs.hand_on(outcome, model, metrics)


def evaluate(config_json: str, job_id: str, train_result: str, probe_decision: str, dataset: Input[Dataset],
             model: Input[Model], metrics: Output[Metrics]) -> str:
    """It seals the run (its manifest, written last); promote, after it, seals it again."""
    import json
    import math

    from components import evaluate, finalize, storage
    from components.config import with_run_id
    from components.errors import user_errors_as_one_line
    from components.run_record import RunRecord

    config = with_run_id(json.loads(config_json), job_id)
    with user_errors_as_one_line(), finalize.recorded(config, "evaluate"):
        summary = evaluate.run(config, dataset.path, model.path,
                               json.loads(train_result), probe_decision=json.loads(probe_decision)
                               if probe_decision else None)
    for key, value in summary["test"].items():
        if isinstance(value, (int, float)) and math.isfinite(value):  # protobuf JSON refuses NaN
            metrics.log_metric(f"test/{key}", value)
    if summary["status"] == "diverged":  # the run is not a result; the submitter exits non-zero
        print(f"evaluate: {RunRecord.from_dict(summary).divergence_line()}")
    return storage.dumps(summary)


def promote(config_json: str, job_id: str, evaluation: str, dataset: Input[Dataset], model: Input[Model]) -> str:
    """After evaluate has sealed the run: champion or not (components/promote.py), the decision
    merged into summary.json as "promotion" and the run sealed again. Any decision is a success;
    a diverged run is never promoted."""
    import json

    from components import finalize, promote, run_store, storage
    from components.config import with_run_id
    from components.errors import user_errors_as_one_line

    config = with_run_id(json.loads(config_json), job_id)
    with user_errors_as_one_line(), finalize.recorded(config, "promote"):
        store = run_store.open_run(config)
        summary = json.loads(evaluation)
        result = promote.run(config, summary, model.path, dataset.path, store)
        promote.publish(summary, result, store)
    return storage.dumps(result)


def study_plan(config_json: str, job_id: str, probe_decision: str, dataset: Input[Dataset]) -> List[str]:
    """The entries carry the study id (the run id) and where its store is."""
    import json
    from pathlib import Path

    from components import finalize, storage, study
    from components.config import with_run_id
    from components.errors import user_errors_as_one_line

    config = with_run_id(json.loads(config_json), job_id)
    with user_errors_as_one_line(), finalize.recorded(config, "study_plan") as note:
        manifest = storage.read_json(Path(dataset.path) / "manifest.json")
        entries = study.plan(config, manifest["counts"]["train"],
                             json.loads(probe_decision) if probe_decision else None, manifest)
        note["runs"] = [f"study_run-{entry['name']}" for entry in entries]  # where finalize reads their notes
    print("study_plan: batch sizes " + ", ".join(str(e["batch_size"]) for e in entries), flush=True)
    return [json.dumps(entry) for entry in entries]


def study_run(run_json: str, dataset: Input[Dataset]) -> str:
    """One batch size's runs (its LR search, run by run), each into its own store inside the
    study's; returns their rows as a JSON list."""
    import json

    from components import finalize, storage, study
    from components.errors import user_errors_as_one_line

    entry = json.loads(run_json)
    where = {**entry["config"], "run_id": entry["study_id"]}  # the study's store (study.study_store)
    # the study's store refusing: one line (a run's own failure is its row)
    with user_errors_as_one_line(), finalize.recorded(where, "study_run", f"study_run-{entry['name']}"):
        rows = study.run_batch(entry, dataset.path)
    for row in rows:
        if row["status"] == "failed":
            print(f"study_run: run {row['name']} failed: {row['error']}", flush=True)
    return storage.dumps(rows)


def study_report(config_json: str, job_id: str, rows: List[str], probe_decision: str, report: Output[HTML]) -> str:
    """The study pipeline's last step: it seals the study."""
    import json

    from components import finalize, study
    from components.config import with_run_id
    from components.errors import user_errors_as_one_line

    config = with_run_id(json.loads(config_json), job_id)
    with user_errors_as_one_line(), finalize.recorded(config, "study_report"):
        result = study.report(config, [json.loads(r) for r in rows],
                              probe=json.loads(probe_decision) if probe_decision else None,
                              html_out=report.path)  # the HTML artifact: shown in the KFP UI
    return json.dumps({k: result[k] for k in ("study_id", "fit", "best", "answer")})


def finalize(config_json: str, run_id: str, job_id: str, steps: List[str], status: dsl.PipelineTaskFinalStatus) -> str:
    """The exit handler: after every other step, whatever became of them. A run that did not succeed
    gets its summary.json (status, the step that failed and why) in its store (components/finalize.py).
    It reads the pipeline's own parameters: resolve_data's merged config may never have been made."""
    import json

    from components import finalize
    from components.errors import user_errors_as_one_line

    with user_errors_as_one_line():
        summary = finalize.run(finalize.run_config(config_json, run_id, job_id), status.state, steps)
    print(f"finalize: {summary['status']} at {summary['step']}: {summary['error']}" if summary else
          f"finalize: {status.state.lower()}", flush=True)
    return json.dumps(summary)


@functools.lru_cache(maxsize=None)
def make_steps(image: str) -> SimpleNamespace:
    """The steps as KFP components running in `image`. The image already holds kfp and
    this project, so nothing is pip-installed when a pod starts."""
    component = functools.partial(dsl.component, base_image=image, install_kfp_package=False)
    return SimpleNamespace(resolve_data=component(resolve_data), data_prep=component(data_prep),
                           probe=component(probe), train=component(train), train_job=component(train_job),
                           evaluate=component(evaluate), promote=component(promote), study_plan=component(study_plan),
                           study_run=component(study_run), study_report=component(study_report),
                           finalize=component(finalize))
