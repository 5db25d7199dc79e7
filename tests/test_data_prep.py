"""data_prep: sources, deterministic stratified splits, normalization, and bad data."""

import json

import numpy as np
import pandas as pd
import pytest

from components import data_prep, datasets, metrics
from components.errors import ConfigError, DataError
from conftest import config


def test_digits_split_is_stratified_and_complete(digits):
    m = digits.manifest
    assert m["counts"] == {"train": 1259, "val": 269, "test": 269}
    assert sum(m["counts"].values()) == 1797
    assert m["input_shape"] == [1, 8, 8] and m["n_classes"] == 10
    for split in ("train", "val", "test"):
        balance = np.array(m["class_balance"][split])
        share = balance / balance.sum()
        assert np.all(np.abs(share - 0.1) < 0.01), (split, share)  # digits classes are ~10% each
    assert digits.split("train")[0].shape == (1259, 1, 8, 8)


def test_normalization_statistics_come_from_the_train_split_only(digits):
    x_train = digits.split("train")[0].reshape(1259, -1)
    x_val = digits.split("val")[0].reshape(269, -1)
    varying = np.array(digits.manifest["normalization"]["std"]) != 1.0
    assert np.allclose(x_train.mean(axis=0), 0, atol=1e-5)
    assert np.allclose(x_train[:, varying].std(axis=0), 1, atol=1e-4)
    assert not np.allclose(x_val.mean(axis=0)[varying], 0, atol=1e-3)  # val is scaled, not re-centred


def test_split_and_version_are_deterministic_by_seed():
    a, b = datasets.build(config().data), datasets.build(config().data)
    c = datasets.build(config(data={"seed": 1}).data)
    assert a.data_version == b.data_version
    assert np.array_equal(a.split("train")[1], b.split("train")[1])
    assert c.data_version != a.data_version


def test_synthetic_is_seeded_and_sized():
    cfg = config(data={"name": "synthetic", "n_samples": 1000, "n_features": 7, "n_classes": 3})
    d = datasets.build(cfg.data)
    assert sum(d.manifest["counts"].values()) == 1000
    assert d.input_shape == (7,) and d.output_dim == 3
    assert datasets.build(cfg.data).data_version == d.data_version
    reg = datasets.build(config(data={"name": "synthetic", "task": "regression", "n_samples": 300},
                                eval={"monitor": "val/loss", "mode": "min"}).data)
    assert reg.output_dim == 1 and reg.split("train")[1].dtype == np.float32
    assert reg.manifest["class_balance"] is None


def _table(n=120, seed=0):
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({"f1": rng.normal(size=n), "f2": rng.normal(size=n), "f3": rng.integers(0, 5, n)})
    frame["label"] = np.where(frame.f1 + frame.f2 > 0, "pos", "neg")
    return frame


@pytest.mark.parametrize("suffix", ["csv", "parquet", "npz"])
def test_user_files_in_every_format(tmp_path, suffix):
    frame = _table()
    path = tmp_path / f"data.{suffix}"
    if suffix == "csv":
        frame.to_csv(path, index=False)
    elif suffix == "parquet":
        frame.to_parquet(path)
    else:
        np.savez(path, X=frame[["f1", "f2", "f3"]].to_numpy(), label=frame.label.to_numpy().astype(str))
    out = tmp_path / "artifact"
    manifest = data_prep.run(config(data={"name": "file", "path": str(path), "target": "label"}).to_dict(), str(out))
    assert manifest["classes"] == ["neg", "pos"]
    assert manifest["input_shape"] == [3]
    assert sum(manifest["counts"].values()) == 120
    loaded = datasets.load(out)
    assert loaded.data_version == manifest["data_version"]
    assert json.loads((out / "manifest.json").read_text())["counts"] == manifest["counts"]


def test_user_csv_regression_target_is_standardized_on_the_train_split(tmp_path):
    frame = _table()
    frame["y"] = frame.f1 * 40.0 + 300.0
    frame.drop(columns=["label"]).to_csv(tmp_path / "r.csv", index=False)
    cfg = config(data={"name": "file", "path": str(tmp_path / "r.csv"), "target": "y", "task": "regression"})
    d = datasets.build(cfg.data)
    assert d.task == "regression" and d.output_dim == 1 and not d.manifest["task_inferred"]
    y_train = d.split("train")[1]
    assert abs(float(y_train.mean())) < 1e-5 and float(y_train.std()) == pytest.approx(1, abs=1e-5)
    # the statistics are the train split's: val and test are scaled by them, not re-centred
    raw = frame.y.to_numpy()
    train_raw = np.sort(metrics.to_original_units(y_train.astype(np.float64), d.target_scale))
    assert d.target_scale["std"] == pytest.approx(train_raw.std(), rel=1e-6)
    assert d.target_scale["mean"] == pytest.approx(train_raw.mean(), rel=1e-6)
    assert d.target_scale["mean"] != pytest.approx(raw.mean(), rel=1e-6)
    restored = metrics.to_original_units(np.concatenate([d.split(s)[1] for s in ("train", "val", "test")]),
                                         d.target_scale)
    assert np.allclose(np.sort(restored), np.sort(raw), rtol=1e-5)
    assert json.loads(json.dumps(d.manifest))["target_scale"] == d.target_scale  # strict JSON


def test_classification_has_no_target_scale(digits):
    assert digits.target_scale is None and digits.manifest["target_scale"] is None
    assert digits.split("train")[1].dtype == np.int64


def _bad(tmp_path, name, frame=None, **data):
    path = tmp_path / name
    if frame is not None:
        frame.to_csv(path, index=False)
    regression = {"monitor": "val/loss", "mode": "min"} if data.get("task") == "regression" else {}
    return config(data={"name": "file", "path": str(path), "target": "label", **data}, eval=regression)


def bad_cases(tmp_path):
    frame = _table()
    nan = frame.copy()
    nan.loc[3, "f2"] = np.nan
    inf = frame.copy()
    inf.loc[5, "f1"] = np.inf
    text = frame.copy()
    text["f3"] = "x"
    tiny = frame.copy()
    tiny.loc[0, "label"] = "rare"
    small = frame.head(2)
    (tmp_path / "data.txt").write_text("a,b\n1,2\n")
    return {
        "missing file": (_bad(tmp_path, "absent.csv"), "data.path: no such file"),
        "unknown format": (_bad(tmp_path, "data.txt"), "data.path: cannot infer the format"),
        "missing target": (_bad(tmp_path, "t.csv", frame, target="y"), "data.target: column 'y' not in t.csv"),
        "NaN": (_bad(tmp_path, "nan.csv", nan), "NaN/inf feature values"),
        "inf": (_bad(tmp_path, "inf.csv", inf), "NaN/inf feature values"),
        "non-numeric": (_bad(tmp_path, "s.csv", text), "non-numeric feature columns in s.csv: f3"),
        "class too small": (_bad(tmp_path, "c.csv", tiny), "class 'rare' has 1 example(s)"),
        "empty split": (_bad(tmp_path, "e.csv", small.drop(columns=["label"]), task="regression", target="f3"),
                        "data: the val split is empty (2 examples"),
        "non-numeric regression target": (_bad(tmp_path, "r.csv", frame, task="regression"),
                                          "data.target: regression targets in"),
    }


@pytest.mark.parametrize("case", ["missing file", "unknown format", "missing target", "NaN", "inf",
                                  "non-numeric", "class too small", "empty split",
                                  "non-numeric regression target"])
def test_bad_data_fails_with_one_line_and_writes_nothing(tmp_path, case):
    cfg, message = bad_cases(tmp_path)[case]
    out = tmp_path / "artifact"
    with pytest.raises(DataError) as err:
        data_prep.run(cfg.to_dict(), str(out))
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".artifact")]  # no temp leftovers


def test_a_misspelt_target_is_named_with_the_column_meant(tmp_path):
    wide = pd.DataFrame({**{f"f{i}": np.arange(6.0) for i in range(24)}, "label": [0, 1] * 3})
    cfg = _bad(tmp_path, "wide.csv", wide, target="Label")
    with pytest.raises(DataError) as err:
        data_prep.run(cfg.to_dict(), str(tmp_path / "artifact"))
    assert str(err.value) == ("data.target: column 'Label' not in wide.csv; did you mean data.target='label'? "
                              f"(columns: {', '.join(f'f{i}' for i in range(20))}, and 5 more)")
    np.savez(tmp_path / "a.npz", X=np.zeros((6, 2), np.float32), labels=np.arange(6))
    cfg = _bad(tmp_path, "a.npz", target="label")
    with pytest.raises(DataError, match=r"and 'label' \(data.target\); did you mean data.target='labels'\?; found: X, labels"):
        data_prep.run(cfg.to_dict(), str(tmp_path / "artifact"))
    cfg = _bad(tmp_path, "t.csv", _table(), target="zzz")
    with pytest.raises(DataError, match=r"^data.target: column 'zzz' not in t.csv \(columns"):  # nothing close: no guess
        data_prep.run(cfg.to_dict(), str(tmp_path / "artifact"))


def test_wrong_shape_for_the_chosen_model_fails_before_training(tmp_path):
    _table().to_csv(tmp_path / "flat.csv", index=False)
    cfg = config(data={"name": "file", "path": str(tmp_path / "flat.csv"), "target": "label"}, model={"name": "cnn"})
    with pytest.raises(DataError, match=r"model.name=cnn needs image input .* shape \(3,\)"):
        data_prep.run(cfg.to_dict(), str(tmp_path / "artifact"))
    assert not (tmp_path / "artifact").exists()


def test_cli_prints_one_line_and_exits_2(tmp_path, capsys):
    cfg = _bad(tmp_path, "absent.csv")
    (tmp_path / "c.json").write_text(json.dumps(cfg.to_dict()))
    with pytest.raises(SystemExit) as exit_info:
        data_prep.main(["--config", str(tmp_path / "c.json"), "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == f"convergence-pipeline error: data.path: no such file: {tmp_path / 'absent.csv'}"


def _exact_cases(tmp_path):
    (tmp_path / "header.csv").write_text("a,b,label\n")
    (tmp_path / "dup.csv").write_text("a,b,a,label,b\n1,2,3,x,4\n5,6,7,y,8\n")
    _table().to_csv(tmp_path / "table.csv", index=False)
    np.save(tmp_path / "one.npy", np.zeros((4, 2)))
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 not really a zip")
    return {
        "header only": ({"path": "header.csv"}, "data.path: header.csv has a header but no rows"),
        "duplicate columns": ({"path": "dup.csv"}, "data.path: dup.csv has duplicate column names: 'a', 'b'; "
                                                   "give every column its own name"),
        "npz on a csv": ({"path": "table.csv", "format": "npz"},
                         "data.path: cannot read table.csv as npz (data.format=npz): not a NumPy .npz archive"),
        "npy as npz": ({"path": "one.npy", "format": "npz"},
                       "data.path: cannot read one.npy as npz (data.format=npz): it holds one array, not an "
                       "archive with arrays 'X' and the target; save it with np.savez"),
        "damaged npz": ({"path": "broken.npz"}, "data.path: cannot read broken.npz as npz (from its suffix): "
                                                "not a NumPy .npz archive: File is not a zip file"),
        "parquet on a csv": ({"path": "table.csv", "format": "parquet"},
                             f"data.path: cannot read {tmp_path / 'table.csv'} as parquet: Could not open Parquet "
                             f"input source '{tmp_path / 'table.csv'}': Parquet magic bytes not found in footer. "
                             "Either the file is corrupted or this is not a parquet file."),
    }


@pytest.mark.parametrize("case", ["header only", "duplicate columns", "npz on a csv", "npy as npz", "damaged npz",
                                  "parquet on a csv"])
def test_unreadable_files_are_named_in_one_line(tmp_path, case):
    data, message = _exact_cases(tmp_path)[case]
    cfg = config(data={"name": "file", "target": "label", **data, "path": str(tmp_path / data["path"])})
    with pytest.raises(DataError) as err:
        data_prep.run(cfg.to_dict(), str(tmp_path / "artifact"))
    assert str(err.value) == message
    assert not (tmp_path / "artifact").exists()


USER_MODELS = '''
import math
import torch

def build(input_shape, output_dim, width=64):
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(math.prod(input_shape), width),
                               torch.nn.ReLU(), torch.nn.Linear(width, output_dim))

def raising(input_shape, output_dim, width=64):
    if width % 2:
        raise ValueError(f"width must be even, got {width}")

def inner_type_error(input_shape, output_dim):
    return len(output_dim)

def needs_depth(input_shape, output_dim, depth):
    pass

def other_names(shape, n_out):
    pass
'''


@pytest.mark.parametrize("factory, kwargs, message", [
    ("raising", {"width": 3}, "model.factory: user_models_b:raising raised ValueError: width must be even, got 3"),
    ("inner_type_error", {}, "model.factory: user_models_b:inner_type_error raised TypeError: "
                             "object of type 'int' has no len()"),
    ("build", {"widht": 128}, "model.factory: user_models_b:build() got an unexpected keyword argument 'widht' "
                              "(model.kwargs)"),
    ("build", {"output_dim": 3}, "model.kwargs.output_dim: the data decides it; remove it from model.kwargs"),
    ("needs_depth", {}, "model.factory: user_models_b:needs_depth() missing a required argument: 'depth' "
                        "(give it with +model.kwargs.depth=...)"),
    ("other_names", {}, "model.factory: user_models_b:other_names() missing a required argument: 'shape' "
                        "(it is called as factory(input_shape=..., output_dim=..., **model.kwargs))"),
])
def test_a_user_factory_that_fails_is_one_line_with_the_traceback_on_stderr(tmp_path, monkeypatch, capsys,
                                                                              factory, kwargs, message):
    (tmp_path / "user_models_b.py").write_text(USER_MODELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(__import__("sys").modules, "user_models_b", raising=False)
    cfg = config(model={"factory": f"user_models_b:{factory}", "kwargs": kwargs})
    with pytest.raises(ConfigError) as err:
        data_prep.run(cfg.to_dict(), str(tmp_path / "artifact"))
    assert str(err.value) == message
    assert not (tmp_path / "artifact").exists()
    stderr = capsys.readouterr().err
    if " raised " in message:  # the user's own code failed: its traceback goes to the step's log
        assert stderr.startswith("Traceback (most recent call last):")
        assert 'user_models_b.py", line' in stderr and message.split(" raised ")[1] in stderr
    else:
        assert stderr == ""


@pytest.mark.parametrize("sections, message", [
    ({"train": {"batch_size": 2048, "micro_batch_size": 32}},
     "train.batch_size: 2048 is larger than the training split (1259 examples); use at most 1259, "
     "or train.batch_size=auto"),
    ({"pipeline": "study", "study": {"batch_sizes": [16, 4096, 64]}, "eval": {"target": 0.9}},
     "study.batch_sizes: batch 4096 is larger than the training split (1259 examples); use sizes up to 1259"),
])
def test_a_batch_larger_than_the_data_is_refused_before_the_dataset_is_written(tmp_path, sections, message):
    with pytest.raises(ConfigError) as err:
        data_prep.run(config(**sections).to_dict(), str(tmp_path / "artifact"))
    assert str(err.value) == message
    assert not (tmp_path / "artifact").exists()


def test_the_whole_training_split_is_a_valid_batch(tmp_path):
    manifest = data_prep.run(config(train={"batch_size": 1259, "micro_batch_size": 1259}).to_dict(),
                             str(tmp_path / "artifact"))
    assert manifest["counts"]["train"] == 1259
