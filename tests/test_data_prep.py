"""data_prep: sources, deterministic stratified splits, normalization, and bad data."""

import json

import numpy as np
import pandas as pd
import pytest

from components import data_prep, datasets
from components.errors import DataError
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


def test_user_csv_regression(tmp_path):
    frame = _table()
    frame["y"] = frame.f1 * 2.0
    frame.drop(columns=["label"]).to_csv(tmp_path / "r.csv", index=False)
    cfg = config(data={"name": "file", "path": str(tmp_path / "r.csv"), "target": "y", "task": "regression"},
                 eval={"monitor": "val/mse", "mode": "min"})
    d = datasets.build(cfg.data)
    assert d.task == "regression" and d.output_dim == 1
    assert np.allclose(np.sort(np.concatenate([d.split(s)[1] for s in ("train", "val", "test")])),
                       np.sort(frame.y.to_numpy(dtype=np.float32)))


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
