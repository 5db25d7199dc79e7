"""Thin KFP component wrappers: each calls one `components.<step>.run` and moves typed
artifacts in and out. Imports live inside the bodies because KFP ships each function's
source alone into its container; the image (Dockerfile) has this package installed."""

import functools
from types import SimpleNamespace
from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output


def data_prep(config_json: str, dataset: Output[Dataset]):
    import json

    from components import data_prep
    from components.errors import user_errors_as_one_line

    with user_errors_as_one_line():
        manifest = data_prep.run(json.loads(config_json), dataset.path)
    dataset.metadata.update({"data_version": manifest["data_version"], "counts": manifest["counts"],
                             "task": manifest["task"]})


def probe(config_json: str, run_dir: str, dataset: Input[Dataset], report: Output[Artifact]) -> NamedTuple(
        "ProbeDecision", [("batch_size", int), ("micro_batch_size", int), ("decision", str)]):
    import json
    from collections import namedtuple

    from components import probe
    from components.errors import user_errors_as_one_line

    with user_errors_as_one_line():
        result = probe.run(json.loads(config_json), dataset.path, report.path, run_dir)
    choice = result["recommendation"]
    report.metadata.update({k: v for k, v in choice.items() if isinstance(v, (int, float))})
    outputs = namedtuple("ProbeDecision", ["batch_size", "micro_batch_size", "decision"])
    return outputs(choice["effective_batch_size"], choice["micro_batch_size"], json.dumps(probe.decision(result)))


def train(config_json: str, run_dir: str, batch_size: int, micro_batch_size: int, dataset: Input[Dataset],
          model: Output[Model], metrics: Output[Metrics]) -> str:
    import json

    from components import train
    from components.config import with_batch_sizes
    from components.errors import user_errors_as_one_line

    with user_errors_as_one_line():
        config = with_batch_sizes(json.loads(config_json), batch_size, micro_batch_size)
        outcome = train.run(config, dataset.path, model.path, run_dir)
    for key in ("optimizer_steps", "samples_seen", "epochs", "wall_time_s", "effective_batch_size",
                "accumulation_steps", "lr", "steps_to_target"):
        if outcome[key] is not None:
            metrics.log_metric(key, outcome[key])
    model.metadata.update({"data_version": outcome["data_version"], "config_hash": outcome["config_hash"]})
    return json.dumps(outcome)


def evaluate(config_json: str, run_dir: str, train_result: str, probe_decision: str, dataset: Input[Dataset],
             model: Input[Model], metrics: Output[Metrics]) -> str:
    import json

    from components import evaluate
    from components.errors import user_errors_as_one_line

    with user_errors_as_one_line():
        summary = evaluate.run(json.loads(config_json), dataset.path, model.path, json.loads(train_result), run_dir,
                               json.loads(probe_decision) if probe_decision else None)
    for key, value in summary["test"].items():
        if isinstance(value, (int, float)):
            metrics.log_metric(f"test/{key}", value)
    return json.dumps(summary)


@functools.lru_cache(maxsize=None)
def make_steps(image: str) -> SimpleNamespace:
    """The steps as KFP components running in `image`. The image already holds kfp and
    this project, so nothing is pip-installed when a pod starts."""
    component = functools.partial(dsl.component, base_image=image, install_kfp_package=False)
    return SimpleNamespace(data_prep=component(data_prep), probe=component(probe), train=component(train),
                           evaluate=component(evaluate))
