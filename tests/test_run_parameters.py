"""The typed pipeline parameters merged over config_json (components/run_parameters.py)."""

import json

import pytest

from components import run_parameters
from components.errors import ConfigError
from pipelines import graph
from pipelines.config import compose_config

DEFAULTS = {"run_id": "", "data_path": "", "data_repo": "", "data_rev": "", "target": "", "batch_size": "auto",
            "micro_batch_size": "auto"}


def merged(overrides=(), **values):
    config = compose_config(["data=digits", *overrides])
    return run_parameters.merge(graph.compiled_config(config), {**DEFAULTS, **values}, graph.compile_time(config))


def test_the_typed_parameters_win_over_config_json_and_empty_is_null():
    config = merged(["eval.target=0.8", "train.batch_size=64", "train.micro_batch_size=64"], target="0.97",
                    batch_size="128", micro_batch_size="32", run_id="nightly-1")
    assert (config["eval"]["target"], config["train"]["batch_size"], config["train"]["micro_batch_size"],
            config["run_id"]) == (0.97, 128, 32, "nightly-1")
    # "" is null: no target, KFP's job id for the run id (components.config.with_run_id)
    config = merged(["eval.target=0.8"], target="")
    assert config["eval"]["target"] is None and config["run_id"] is None
    dvc = compose_config(["data=dvc", "data.repo=https://example.com/data.git", "data.path=d.csv", "data.rev=v1"])
    values = {**run_parameters.values_of(dvc), "data_rev": "v2"}
    assert run_parameters.merge(json.dumps(dvc), values)["data"] == {**dvc["data"], "rev": "v2"}


def test_values_of_a_config_merge_back_to_the_same_config():
    config = compose_config(["data=file", "data.path=s3://b/t.csv", "eval.target=0.9", "train.batch_size=64",
                             "train.micro_batch_size=16", "run_id=r1"])
    values = run_parameters.values_of(config)
    assert values == {"run_id": "r1", "data_path": "s3://b/t.csv", "data_repo": "", "data_rev": "", "target": "0.9",
                      "batch_size": "64", "micro_batch_size": "16"}
    assert run_parameters.merge(json.dumps(config), values) == config


@pytest.mark.parametrize("values, message", [
    ({"batch_size": "sixty"}, "batch_size: 'auto' or a positive integer; got 'sixty'"),
    ({"micro_batch_size": "0"}, "micro_batch_size: 'auto' or a positive integer; got '0'"),
    ({"target": "high"}, r"target: a number \(the value of eval.monitor to reach\) or empty for none; got 'high'"),
    ({"target": "nan"}, "target: a number"),
    ({"data_path": "x.csv"}, r"data_path: data.name=digits reads no data.path \(used with data.name=file or dvc\)"),
    ({"data_rev": "main"}, r"data_rev: data.name=digits reads no data.rev \(used with data.name=dvc\)"),
    ({"run_id": "a b"}, "run_id: use letters, digits"),  # the config's own rules, one line
    ({"batch_size": "64", "micro_batch_size": "48"}, "train.batch_size: effective batch 64 is not divisible"),
])
def test_bad_parameters_are_one_line_naming_them(values, message):
    with pytest.raises(ConfigError, match=f"^{message}"):
        merged(**values)


def test_without_the_probe_auto_is_refused_at_run_time():
    with pytest.raises(ConfigError, match=r"^train\.batch_size: with probe\.enabled=false, train\.batch_size and "):
        merged(["probe.enabled=false", "train.batch_size=32", "train.micro_batch_size=32"], batch_size="auto")


def test_config_json_cannot_change_what_was_compiled():
    config = compose_config(["data=digits"])
    edited = json.dumps({**config, "probe": {**config["probe"], "enabled": False}})
    with pytest.raises(ConfigError, match=r"^probe\.enabled: fixed when the pipeline was compiled \(true\), "
                                          r"config_json says false; compile and submit again to change it$"):
        run_parameters.merge(edited, DEFAULTS, graph.compile_time(config))
    with pytest.raises(ConfigError, match=r"^config_json: not JSON"):
        run_parameters.merge("{", DEFAULTS)
