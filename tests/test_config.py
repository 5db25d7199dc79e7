"""The config contract: composition, schema errors naming the key, range checks."""

from pathlib import Path

import pytest

from components.config import config_hash, parse_config
from components.errors import ConfigError
from pipelines import submit
from pipelines.config import CONF_DIR, compose_config

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


def test_defaults_compose_to_the_documented_pipeline():
    cfg = compose_config([])
    assert (cfg["data"]["name"], cfg["data"]["path"]) == ("dvc", "data/digits.csv")  # the example data, through DVC
    assert cfg["model"]["name"] == "mlp"
    assert cfg["train"]["batch_size"] == "auto" and cfg["train"]["micro_batch_size"] == "auto"
    assert cfg["probe"]["enabled"] is True
    assert cfg["eval"]["monitor"] == "val/accuracy" and cfg["eval"]["every_steps"] is None
    assert cfg["tracking"]["mode"] == "offline"
    assert cfg["platform"]["name"] == "local"
    assert cfg["output_dir"] == "runs" and cfg["run_id"] is None


def test_overrides_reach_the_resolved_config():
    cfg = compose_config(["data=synthetic", "data.n_samples=500", "train.batch_size=256",
                          "train.micro_batch_size=64", "eval.target=0.95", "model.hidden_sizes=[32]"])
    assert cfg["data"]["name"] == "synthetic" and cfg["data"]["n_samples"] == 500
    assert cfg["train"]["batch_size"] == 256 and cfg["train"]["micro_batch_size"] == 64
    assert parse_config(cfg).accumulation_steps == 4
    assert cfg["eval"]["target"] == 0.95
    assert cfg["model"]["hidden_sizes"] == [32]


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes(name):
    cfg = compose_config([f"experiment={name}"])
    assert parse_config(cfg).to_dict() == cfg


@pytest.mark.parametrize("overrides, message", [
    (["train.lr=abc"], "train.lr: Value 'abc'"),
    (["train.bacth_size=64"], "train.bacth_size: unknown key (did you mean 'batch_size'?)"),
    (["+nonsense=1"], "nonsense: unknown key"),
    (["data=nope"], "data: no config named 'nope' (available: digits, dvc, example, file, synthetic)"),
    (["data=file"], "data.path: required"),
    (["train.lr=-1"], "train.lr: must be > 0"),
    (["train.batch_size=0"], "train.batch_size: must be a positive integer or 'auto'; got 0"),
    (["train.micro_batch_size=-8"], "train.micro_batch_size: must be a positive integer or 'auto'; got -8"),
    (["train.batch_size=1.5"], "train.batch_size: must be a positive integer or 'auto'; got 1.5"),
    (["train.batch_size=big"], "train.batch_size: must be a positive integer or 'auto'; got 'big'"),
    (["train.batch_size=32", "train.micro_batch_size=64"],
     "train.micro_batch_size: micro-batch 64 is larger than the effective batch 32"),
    (["probe.enabled=false"], "train.batch_size: with probe.enabled=false, train.batch_size and "
                              "train.micro_batch_size must be numbers"),
    (["probe.memory_margin=1"], "probe.memory_margin: must be in [0, 1)"),
    (["probe.noise_accumulation=1"], "probe.noise_accumulation: must be >= 2"),
    (["platform.gpu.count=-1"], "platform.gpu.count: must be >= 0"),
    (["train.batch_size=48", "train.micro_batch_size=32"], "train.batch_size: effective batch 48 is not divisible"),
    (["train.optimizer=adam"], "train.optimizer: must be one of sgd, adamw"),
    (["train.lr_scaling=cubic"], "train.lr_scaling: must be one of none, linear, sqrt"),
    (["train.schedule=step"], "train.schedule: must be one of constant, cosine"),
    (["train.max_steps=0"], "train.max_steps: must be > 0 or null"),
    (["train.schedule_steps=0"], "train.schedule_steps: must be a positive integer or null; got 0"),
    (["train.max_steps=abc"], "train.max_steps: Value 'abc'"),
    (["data.val_fraction=0"], "data.val_fraction: must be in (0, 1)"),
    (["data.val_fraction=0.5", "data.test_fraction=0.5"], "data.val_fraction: val_fraction + test_fraction"),
    (["data=digits", "data.task=regression"], "data.task: digits is a classification dataset"),
    (["data=synthetic", "data.task=regression", "eval.monitor=val/accuracy"],
     "eval.monitor: must be one of val/loss, val/mse, val/mae, val/r2; got 'val/accuracy'"),
    (["eval.mode=up"], "eval.mode: must be one of max, min"),
    (["eval.patience=0"], "eval.patience: must be > 0"),
    (["model.dropout=1.5"], "model.dropout: must be in [0, 1)"),
    (["model.factory=nocolon"], "model.factory: must look like 'package.module:function'"),
    (["tracking.mode=cloud"], "tracking.mode: must be one of offline, online, disabled"),
    (["run_id=a/b"], "run_id: use letters, digits"),
    (["run_id=registry"], "run_id: registry is where the model registry lives (<output_dir>/registry"),
    (["output_dir=s3:/bucket/runs"], "output_dir: 's3:/bucket/runs' looks like a URI with one slash; write s3://"),
    (["resume_from=s3:/b/runs/r1"], "resume_from: 's3:/b/runs/r1' looks like a URI with one slash"),
])
def test_bad_config_fails_with_one_line_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        compose_config(overrides)
    text = str(err.value)
    assert message in text
    assert "\n" not in text


def test_submit_rejects_bad_config_before_any_work(tmp_path, capsys):
    code = submit.main(["train.lr=-1", f"output_dir={tmp_path / 'out'}", "run_id=r"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: train.lr: must be > 0; got -1.0"
    assert not (tmp_path / "out").exists()


def test_submit_rejects_missing_data_file_before_any_work(tmp_path, capsys):
    code = submit.main(["data=file", "data.path=missing.csv", f"output_dir={tmp_path / 'out'}"])
    assert code == 2
    assert capsys.readouterr().err.strip() == f"error: data.path: no such file: {tmp_path / 'missing.csv'}"
    assert not (tmp_path / "out").exists()


def test_config_hash_ignores_where_a_run_is_recorded_but_not_what_it_computes():
    base = compose_config([])
    moved = compose_config(["output_dir=elsewhere", "run_id=x", "tracking.mode=disabled"])
    changed = compose_config(["train.lr=0.1"])
    assert config_hash(parse_config(base)) == config_hash(parse_config(moved))
    assert config_hash(parse_config(base)) != config_hash(parse_config(changed))


def test_print_config_shows_the_resolved_config(capsys):
    assert submit.main(["--print-config", "train.batch_size=64"]) == 0
    out = capsys.readouterr().out
    assert "batch_size: 64" in out and "run_id:" in out
    assert not Path("runs").exists() or not any(Path("runs").iterdir())
