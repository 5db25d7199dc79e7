"""Regression on a user's data: the target is standardized on the train split, training sees
it standardized, metrics and predictions come back in its own units; the task and the
monitor follow the data when not given."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn import metrics as skm
from sklearn.datasets import load_diabetes

from components import data_prep, data_sources, datasets, evaluate, metrics, storage, train
from components.config import for_dataset, parse_config
from components.errors import ConfigError, DataError
from conftest import config
from pipelines.config import compose_config

ROOT = Path(__file__).resolve().parent.parent


def strict_json(path: Path):
    def refuse(token):
        raise ValueError(f"{path.name} holds {token}")

    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.fixture
def diabetes_csv(tmp_path) -> Path:
    """scikit-learn's diabetes table with its target in its own units (25-346), as a user has it."""
    frame = load_diabetes(scaled=False, as_frame=True).frame
    assert frame.target.min() == 25 and frame.target.max() == 346
    path = tmp_path / "diabetes.csv"
    frame.to_csv(path, index=False)
    return path


def file_config(path: Path, target: str = "target", **sections) -> dict:
    return config(data={"name": "file", "path": str(path), "target": target, **sections.pop("data", {})},
                  **sections).to_dict()


def test_unscaled_diabetes_trains_with_the_defaults_through_the_pipeline(tmp_path, diabetes_csv):
    """What was seen: loss 19,730 -> inf by step 5, NaN in summary.json, or test R2 = -58,562.
    No data.task: it is inferred from the target."""
    out = tmp_path / "runs"
    env = {**os.environ, "WANDB_MODE": "disabled", "DVC_NO_ANALYTICS": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "pipelines.submit", "data=file", f"data.path={diabetes_csv}",
                           "data.target=target", f"output_dir={out}", "run_id=diabetes", "--no-progress"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = out / "diabetes"
    summary = strict_json(run_dir / "summary.json")
    assert summary["status"] == "completed"
    assert summary["best_metric"]["name"] == "val/r2"  # the monitor followed the inferred task
    assert summary["test"]["r2"] >= 0.3, summary["test"]
    assert "task regression, inferred from the target 'target'" in (run_dir / "pipeline.log").read_text()

    # test metrics are in the target's units, and so are the saved model's predictions
    raw = file_config(diabetes_csv)
    data = datasets.build(parse_config(raw).data, data_sources.resolve(raw))
    assert data.data_version == summary["data_version"]  # the file's sha256
    x_test, y_test = data.split("test")
    y_raw = metrics.to_original_units(y_test.astype(np.float64), data.target_scale)
    model, checkpoint = train.load_model(run_dir / train.MODEL_FILE)
    assert checkpoint["target_scale"] == data.target_scale
    pred = metrics.to_original_units(metrics.predict(model, torch.as_tensor(x_test)).double().numpy().ravel(),
                                     checkpoint["target_scale"])
    assert summary["test"]["r2"] == pytest.approx(skm.r2_score(y_raw, pred), rel=1e-6)
    assert summary["test"]["mse"] == pytest.approx(skm.mean_squared_error(y_raw, pred), rel=1e-6)
    assert summary["test"]["mae"] == pytest.approx(skm.mean_absolute_error(y_raw, pred), rel=1e-6)
    assert 500 < summary["test"]["mse"] < 6000  # squared units of a 25-346 target, not standardized ones


def test_unscaled_diabetes_trains_at_component_level(tmp_path, diabetes_csv):
    """data_prep -> train -> evaluate at the batch the probe picks here (32), every metric in
    original units; the first training loss is O(1) because training sees the standardized target."""
    raw = file_config(diabetes_csv)
    manifest = data_prep.run(raw, str(tmp_path / "dataset"))
    assert manifest["task"] == "regression" and manifest["task_inferred"]
    assert manifest["target_scale"]["mean"] == pytest.approx(153.6, abs=0.1)  # the train split's
    raw = for_dataset(raw, manifest)
    assert (raw["eval"]["monitor"], raw["eval"]["mode"]) == ("val/r2", "max")
    run_dir = tmp_path / "run"
    outcome = train.run(raw, str(tmp_path / "dataset"), str(tmp_path / "model.pt"), str(run_dir), progress=False)
    summary = evaluate.run(raw, str(tmp_path / "dataset"), str(tmp_path / "model.pt"), outcome, str(run_dir))
    assert summary["test"]["r2"] >= 0.3, summary["test"]
    rows = storage.read_jsonl(run_dir / "metrics.jsonl")
    first_loss = next(r["train/loss"] for r in rows if "train/loss" in r)
    assert first_loss < 5  # unscaled it was ~19,730
    evals = [r for r in rows if "val/r2" in r]
    assert evals and all(np.isfinite([r["val/mse"], r["val/mae"], r["val/r2"]]).all() for r in evals)
    std = manifest["target_scale"]["std"]
    # val/loss is the standardized MSE the model trains on; val/mse is the same error in target units
    assert all(r["val/mse"] == pytest.approx(r["val/loss"] * std ** 2, rel=1e-6) for r in evals)


def test_constant_target_is_refused_at_data_prep(tmp_path):
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"a": rng.normal(size=60), "b": rng.normal(size=60), "y": 7.5})
    frame.to_csv(tmp_path / "c.csv", index=False)
    for task in (None, "regression"):
        with pytest.raises(DataError) as err:
            data_prep.run(file_config(tmp_path / "c.csv", "y", data={"task": task}), str(tmp_path / "out"))
        assert str(err.value) == f"data.target: 'y' has the same value (7.5) in every row of {tmp_path / 'c.csv'}; " \
                                 "there is nothing to learn"
    assert not (tmp_path / "out").exists()


def test_a_continuous_target_given_as_classification_is_refused_with_the_fix():
    rng = np.random.default_rng(0)
    source = datasets.Source(rng.normal(size=(300, 3)).astype(np.float32), rng.normal(size=300) * 1e3, "h.csv")
    cfg = config(data={"name": "file", "path": "h.csv", "target": "price", "task": "classification"}).data
    with pytest.raises(DataError) as err:
        datasets.build_from(source, cfg)
    assert str(err.value) == "data.task: classification, but the target 'price' has 300 distinct values in " \
                             "300 rows; did you mean data.task=regression?"


def test_target_constant_on_the_training_split_only_is_refused():
    y = np.zeros(100)
    idx = datasets.split_indices(y, "regression", 0.15, 0.15, seed=0)
    y[idx["val"][0]] = 1.0  # the target varies, but not where the model learns
    source = datasets.Source(np.random.default_rng(0).normal(size=(100, 2)).astype(np.float32), y, "t.csv")
    cfg = config(data={"name": "file", "path": "t.csv", "target": "y", "task": "regression"}).data
    with pytest.raises(DataError) as err:
        datasets.build_from(source, cfg)
    assert str(err.value) == "data.target: 'y' is constant on the training split (every value 0); " \
                             "a regression target must vary"


@pytest.mark.parametrize("y, task", [
    (np.tile(np.arange(5), 40), "classification"),  # integer labels
    (np.tile(np.arange(5.0), 40), "classification"),  # integer-valued floats
    (np.linspace(0, 1, 200), "regression"),  # floats
    (np.tile([0.5, 1.5], 100), "regression"),  # two values, but not integers
    (np.tile(["cat", "dog"], 100), "classification"),
    (np.tile([True, False], 100), "classification"),
    (np.arange(200) % 20, "classification"),  # 20 classes of 10: at the limit n // 10
    (np.arange(200) % 21, "regression"),  # 21 integer values in 200 rows: too many for classes
    (np.tile([0, 1], 6), "classification"),  # two values are always classes
    (load_diabetes(scaled=False).target, "regression"),  # 214 integer values in 442 rows
])
def test_task_inference(y, task):
    assert datasets.infer_task(y)[0] == task


def test_inferred_task_reaches_the_manifest_and_the_log(tmp_path, capsys):
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"a": rng.normal(size=200), "b": rng.normal(size=200)})
    frame["label"] = (frame.a > 0).astype(int) + (frame.b > 0).astype(int)  # 0, 1, 2
    frame["y"] = frame.a * 3 + frame.b
    frame.to_csv(tmp_path / "t.csv", index=False)
    labels = data_prep.run(file_config(tmp_path / "t.csv", "label"), str(tmp_path / "o1"))
    assert (labels["task"], labels["task_inferred"], labels["n_classes"]) == ("classification", True, 3)
    assert labels["target_scale"] is None
    assert "data_prep: task classification, inferred from the target 'label' (3 distinct integer values)" \
           in capsys.readouterr().out
    values = data_prep.run(file_config(tmp_path / "t.csv", "y"), str(tmp_path / "o2"))
    assert (values["task"], values["task_inferred"], values["task_reason"]) == ("regression", True, "non-integer values")
    assert "data_prep: task regression, inferred from the target 'y' (non-integer values)" in capsys.readouterr().out
    given = data_prep.run(file_config(tmp_path / "t.csv", "label", data={"task": "regression"}), str(tmp_path / "o3"))
    assert (given["task"], given["task_inferred"], given["task_reason"]) == ("regression", False, None)
    assert "data_prep: task" not in capsys.readouterr().out  # nothing was inferred


def test_monitor_and_mode_follow_the_task():
    regression = compose_config(["data=file", "data.path=x.csv", "data.task=regression"])  # alone: accepted
    assert (regression["eval"]["monitor"], regression["eval"]["mode"]) == ("val/r2", "max")
    digits = compose_config([])
    assert (digits["data"]["task"], digits["eval"]["monitor"], digits["eval"]["mode"]) == \
           ("classification", "val/accuracy", "max")
    inferred = compose_config(["data=file", "data.path=x.csv"])
    assert (inferred["data"]["task"], inferred["eval"]["monitor"], inferred["eval"]["mode"]) == (None, None, None)
    mse = compose_config(["data=file", "data.path=x.csv", "eval.monitor=val/mse"])
    assert mse["eval"]["mode"] == "min"  # the mode follows the monitor


@pytest.mark.parametrize("overrides, message", [
    (["data=digits", "data.task=regression"], "data.task: digits is a classification dataset"),
    (["data=synthetic", "data.task=regression", "eval.monitor=val/accuracy"],
     "eval.monitor: must be one of val/loss, val/mse, val/mae, val/r2; got 'val/accuracy'"),
    (["eval.monitor=val/mse", "eval.mode=max"],
     "eval.monitor: must be one of val/loss, val/accuracy, val/macro_f1; got 'val/mse'"),
    (["data=file", "data.path=x.csv", "eval.monitor=val/mse", "eval.mode=max"],
     "eval.mode: val/mse improves towards smaller values; use eval.mode=min"),
    (["data=file", "data.path=x.csv", "eval.monitor=val/rmse"],
     "eval.monitor: must be one of val/loss, val/mse, val/mae, val/accuracy, val/macro_f1, val/r2; got 'val/rmse'"),
])
def test_explicit_monitor_and_mode_are_still_checked(overrides, message):
    with pytest.raises(ConfigError) as err:
        compose_config(overrides)
    assert str(err.value) == message


def test_for_dataset_fills_from_the_manifest_and_refuses_contradictions():
    raw = compose_config(["data=file", "data.path=x.csv"])
    manifest = {"task": "regression", "task_inferred": True, "target": "target", "origin": "x.csv"}
    resolved = for_dataset(raw, manifest)
    assert (resolved["data"]["task"], resolved["eval"]["monitor"], resolved["eval"]["mode"]) == \
           ("regression", "val/r2", "max")
    assert raw["eval"]["monitor"] is None  # the caller's dict is left as it was
    assert parse_config(resolved).eval.monitor == "val/r2"
    with pytest.raises(ConfigError) as err:
        for_dataset({**raw, "eval": {**raw["eval"], "monitor": "val/accuracy"}}, manifest)
    assert str(err.value) == ("eval.monitor: val/accuracy is not computed for regression (inferred from the "
                              "target 'target' of x.csv); use one of val/loss, val/mse, val/mae, val/r2 "
                              "(or set data.task)")
    with pytest.raises(ConfigError) as err:
        for_dataset({**raw, "data": {**raw["data"], "task": "classification"}}, {**manifest, "task_inferred": False})
    assert str(err.value) == "data.task: the config says classification but the dataset is regression (of x.csv)"


def test_metrics_in_original_units_match_sklearn_on_unstandardized_predictions():
    rng = np.random.default_rng(3)
    y_raw = rng.normal(200, 80, size=500)
    pred_raw = y_raw + rng.normal(0, 30, size=500)
    mean, std = 190.0, 75.0
    y, pred = torch.as_tensor((y_raw - mean) / std), torch.as_tensor((pred_raw - mean) / std)
    for scale in ((mean, std), {"mean": mean, "std": std}, {"target_scale": {"mean": mean, "std": std}}):
        out = metrics.regression(pred.reshape(-1, 1), y, scale)
        assert out["mse"] == pytest.approx(skm.mean_squared_error(y_raw, pred_raw), rel=1e-9)
        assert out["mae"] == pytest.approx(skm.mean_absolute_error(y_raw, pred_raw), rel=1e-9)
        assert out["r2"] == pytest.approx(skm.r2_score(y_raw, pred_raw), rel=1e-9)
        assert out["loss"] == pytest.approx(skm.mean_squared_error(y, pred), rel=1e-9)  # standardized
    linear = torch.nn.Linear(1, 1).double()
    with torch.no_grad():
        linear.weight.fill_(1.0), linear.bias.fill_(0.0)
    val = metrics.evaluate(linear, pred.reshape(-1, 1), y, "regression", target_scale=(mean, std))
    assert val["val/mse"] == pytest.approx(skm.mean_squared_error(y_raw, pred_raw), rel=1e-9)
    assert metrics.to_original_units(pred.numpy(), {"mean": mean, "std": std}) == pytest.approx(pred_raw)
    assert metrics.to_original_units(pred, None) is pred
