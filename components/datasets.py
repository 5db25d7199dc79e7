"""Datasets: where examples come from, how they are split, and the dataset artifact on disk.

The artifact is a directory holding `arrays.npz` (normalized features and encoded targets
per split; a regression target standardized by its train-split mean and std) and
`manifest.json` (schema, task and whether it was inferred, counts, class balance,
normalization statistics, `target_scale`, `source`: where the data came from as
components/data_sources.py resolved it, and `data_version`: the source's version, a DVC md5, a
file's sha256 or an S3 VersionId/ETag, or for generated data a hash of the content). Every later
step reads only this artifact.
"""

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from components import data_sources, storage
from components.config import DATA_FORMATS, DataConfig, known_task
from components.errors import DataError

SPLITS = ("train", "val", "test")


@dataclass
class Source:
    """Raw examples before splitting. `y` holds class labels (any type) or float targets."""

    x: np.ndarray  # (n, *input_shape), float
    y: np.ndarray  # (n,)
    origin: str
    feature_names: Optional[List[str]] = None


@dataclass
class Dataset:
    """The dataset artifact in memory."""

    arrays: dict  # x_train, y_train, x_val, y_val, x_test, y_test
    manifest: dict

    def split(self, name: str) -> Tuple[np.ndarray, np.ndarray]:
        return self.arrays[f"x_{name}"], self.arrays[f"y_{name}"]

    @property
    def task(self) -> str:
        return self.manifest["task"]

    @property
    def input_shape(self) -> Tuple[int, ...]:
        return tuple(self.manifest["input_shape"])

    @property
    def output_dim(self) -> int:
        return self.manifest["n_classes"] if self.task == "classification" else 1

    @property
    def data_version(self) -> str:
        return self.manifest["data_version"]

    @property
    def target_scale(self) -> Optional[dict]:
        """{"mean", "std"} of a regression target on the train split (the arrays hold
        (y - mean) / std); None for classification. metrics.evaluate takes it."""
        return self.manifest.get("target_scale")


# ---------------------------------------------------------------- sources

def load_source(cfg: DataConfig, local_file: Optional[Path] = None, origin: Optional[str] = None) -> Source:
    """`local_file`: data_prep's checked copy of a file from DVC or S3 (cfg.path names it there)."""
    source = _load_source(cfg, local_file, origin)
    if cfg.input_shape:
        source.x = _reshape(source, cfg.input_shape)
    return source


def _load_source(cfg: DataConfig, local_file: Optional[Path], origin: Optional[str]) -> Source:
    if cfg.name == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()  # ships inside scikit-learn: no download
        return Source(digits.images[:, None, :, :].astype(np.float32), digits.target, "sklearn.datasets.load_digits")
    if cfg.name == "synthetic":
        return synthetic(cfg)
    return load_file(cfg, local_file, origin)


def _reshape(source: Source, shape: List[int]) -> np.ndarray:
    per_example = int(np.prod(source.x.shape[1:]))
    if per_example != int(np.prod(shape)):
        raise DataError(f"data.input_shape: {list(shape)} holds {int(np.prod(shape))} values per example, but "
                        f"{source.origin} has {per_example}")
    return source.x.reshape(len(source.x), *shape)


def synthetic(cfg: DataConfig) -> Source:
    """Seeded Gaussian classes around random centres (classification), or a noisy
    nonlinear function of the features (regression). `noise` sets the overlap."""
    rng = np.random.default_rng(cfg.seed)
    n, f, task = cfg.n_samples, cfg.n_features, known_task(cfg)
    if task == "classification":
        centers = rng.normal(size=(cfg.n_classes, f)) * 2.5 / np.sqrt(f)  # ~3.5 apart at noise 1
        y = rng.integers(0, cfg.n_classes, size=n)
        x = centers[y] + cfg.noise * rng.normal(size=(n, f))
    else:
        x = rng.normal(size=(n, f))
        w1, w2 = rng.normal(size=f) / np.sqrt(f), rng.normal(size=f) / np.sqrt(f)
        y = x @ w1 + np.tanh(x @ w2) + cfg.noise * 0.1 * rng.normal(size=n)
    name = f"synthetic(task={task}, n={n}, features={f}, seed={cfg.seed})"
    return Source(x.astype(np.float32), y, name)


def infer_format(cfg: DataConfig) -> str:
    if cfg.format:
        return cfg.format
    suffix = Path(cfg.path).suffix.lower().lstrip(".")
    fmt = {"csv": "csv", "parquet": "parquet", "pq": "parquet", "npz": "npz"}.get(suffix)
    if fmt is None:
        raise DataError(f"data.path: cannot infer the format of {cfg.path!r} from its suffix; "
                        f"set data.format to one of {', '.join(DATA_FORMATS)}")
    return fmt


def load_file(cfg: DataConfig, local_file: Optional[Path] = None, origin: Optional[str] = None) -> Source:
    path = Path(local_file or cfg.path)
    if not path.is_file():
        raise DataError(f"data.path: no such file: {cfg.path}")
    fmt = infer_format(cfg)
    if fmt == "npz":
        return _load_npz(path, cfg.target, "data.format=npz" if cfg.format else "from its suffix", origin)
    import pandas as pd

    try:
        frame = pd.read_csv(path) if fmt == "csv" else pd.read_parquet(path)
    except Exception as exc:  # parser errors differ by engine; name the file and the cause
        raise DataError(f"data.path: cannot read {path} as {fmt}: {_first_line(exc)}") from None
    # pandas renames a repeated CSV column 'a' to 'a.1' without a word: look at the header itself
    header = _csv_header(path) if fmt == "csv" else [str(c) for c in frame.columns]
    repeated = sorted({c for c in header if header.count(c) > 1})
    if repeated:
        raise DataError(f"data.path: {path.name} has duplicate column names: "
                        f"{', '.join(repr(c) for c in repeated[:10])}; give every column its own name")
    if len(frame) == 0:
        raise DataError(f"data.path: {path.name} has a header but no rows" if fmt == "csv" else
                        f"data.path: {path.name} has columns but no rows")
    if cfg.target not in frame.columns:
        names = [str(c) for c in frame.columns]
        more = f", and {len(names) - 20} more" if len(names) > 20 else ""
        raise DataError(f"data.target: column {cfg.target!r} not in {path.name}{did_you_mean(cfg.target, names)} "
                        f"(columns: {', '.join(names[:20])}{more})")
    features = frame.drop(columns=[cfg.target])
    if features.shape[1] == 0:
        raise DataError(f"data.path: {path.name} has no feature columns besides the target")
    non_numeric = [str(c) for c in features.columns if not pd.api.types.is_numeric_dtype(features[c])
                   or pd.api.types.is_bool_dtype(features[c])]
    if non_numeric:
        raise DataError(f"data.path: non-numeric feature columns in {path.name}: {', '.join(non_numeric[:10])} "
                        "(encode them as numbers first)")
    y = frame[cfg.target].to_numpy()
    return Source(features.to_numpy(dtype=np.float32), y, origin or str(path), [str(c) for c in features.columns])


def did_you_mean(name: str, names: List[str]) -> str:
    """'; did you mean data.target='target'?' for the column a user most likely meant (the same name in another
    case first, then the closest spelling); '' when none is close."""
    import difflib

    close = [n for n in names if n.lower() == name.lower()] or difflib.get_close_matches(name, names, n=1)
    return f"; did you mean data.target={close[0]!r}?" if close else ""


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _csv_header(path: Path) -> List[str]:
    import csv

    # pandas has already parsed the file, so its first line is text; utf-8-sig drops a BOM
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
        return next(csv.reader(f), [])


def _load_npz(path: Path, target: str, why_npz: str, origin: Optional[str] = None) -> Source:
    try:
        npz = np.load(path, allow_pickle=False)
    except Exception as exc:  # a CSV, a pickle, a damaged zip: name the file and the format
        # numpy calls anything that is not an array file "pickled data": that hint misleads here
        detail = "" if "pickle" in str(exc) else f": {_first_line(exc)}"
        raise DataError(f"data.path: cannot read {path.name} as npz ({why_npz}): not a NumPy .npz "
                        f"archive{detail}") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):  # a single .npy array
        raise DataError(f"data.path: cannot read {path.name} as npz ({why_npz}): it holds one array, not "
                        "an archive with arrays 'X' and the target; save it with np.savez")
    with npz:
        keys = list(npz.keys())
        if "X" not in npz or target not in npz:
            hint = did_you_mean(target, [k for k in keys if k != "X"]) if "X" in npz else ""
            raise DataError(f"data.path: {path.name} must hold arrays 'X' and {target!r} (data.target){hint}; "
                            f"found: {', '.join(keys)}")
        try:
            x, y = npz["X"], npz[target]
        except ValueError:  # object arrays would need pickle, which can run code: refuse
            raise DataError(f"data.path: {path.name} holds object arrays; save numeric X and a numeric "
                            "or string target") from None
        except Exception as exc:  # a damaged member of the archive
            raise DataError(f"data.path: cannot read {path.name} as npz ({why_npz}): {_first_line(exc)}") from None
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.bool_):
        raise DataError(f"data.path: array 'X' in {path.name} is not numeric (dtype {x.dtype})")
    if x.ndim < 2 or y.ndim != 1 or len(x) != len(y):
        raise DataError(f"data.path: {path.name} needs X of shape (n, ...) and {target!r} of shape (n,); "
                        f"got {x.shape} and {y.shape}")
    return Source(x.astype(np.float32), y, origin or str(path))


# ---------------------------------------------------------------- task, checks, split, normalize

# data.task=null: a target is a class label when it is not numeric (strings, booleans), or when
# it takes a few integer-like values: all integers, and at most max(2, min(50, n // 10))
# distinct ones (on average at least 10 examples a class; two values are always classes).
# Otherwise it is a regression target. Diabetes' 214 integer values in 442 rows: regression;
# digits' 10 labels in 1797 rows: classification.
MAX_INFERRED_CLASSES = 50
MIN_EXAMPLES_PER_CLASS = 10


def infer_task(y: np.ndarray) -> Tuple[str, str]:
    """(task, why) from the raw target values."""
    if y.dtype.kind not in "iuf":
        return "classification", f"non-numeric values ({y.dtype})"
    distinct = np.unique(y[np.isfinite(y)] if y.dtype.kind == "f" else y)
    limit = max(2, min(MAX_INFERRED_CLASSES, len(y) // MIN_EXAMPLES_PER_CLASS))
    if not np.array_equal(distinct, np.round(distinct)):
        return "regression", "non-integer values"
    if len(distinct) <= limit:
        return "classification", f"{len(distinct)} distinct integer values"
    return "regression", (f"{len(distinct)} distinct integer values, more than the {limit} that count "
                          f"as classes for {len(y)} rows")


def _missing(y: np.ndarray) -> np.ndarray:
    if y.dtype.kind == "f":
        return np.isnan(y)
    if y.dtype.kind == "O":  # pandas puts NaN or None in an object column's empty cells
        return np.array([v is None or (isinstance(v, float) and v != v) for v in y], dtype=bool)
    return np.zeros(len(y), dtype=bool)


def check_finite(source: Source, task: str) -> None:
    x = source.x.reshape(len(source.x), -1)
    bad = ~np.isfinite(x)
    if bad.any():
        cols = np.flatnonzero(bad.any(axis=0))
        names = [source.feature_names[c] if source.feature_names else f"#{c}" for c in cols[:5]]
        raise DataError(f"data: {int(bad.sum())} NaN/inf feature values in {source.origin} "
                        f"(features {', '.join(names)}); clean or impute them first")
    if task == "regression":
        try:
            y = source.y.astype(np.float64)
        except (TypeError, ValueError):
            raise DataError(f"data.target: regression targets in {source.origin} are not numeric") from None
        if not np.isfinite(y).all():
            raise DataError(f"data.target: {int((~np.isfinite(y)).sum())} NaN/inf targets in {source.origin}")
    elif _missing(source.y).any():
        raise DataError(f"data.target: {int(_missing(source.y).sum())} missing labels in {source.origin}")


def split_indices(y: np.ndarray, task: str, val_fraction: float, test_fraction: float,
                  seed: int, class_names=None) -> dict:
    """Deterministic split by seed; stratified by class for classification, so every split
    has each class in proportion (at least one example per class per split)."""
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(y == c) for c in np.unique(y)] if task == "classification" else [np.arange(len(y))]
    parts = {name: [] for name in SPLITS}
    for group in groups:
        group = rng.permutation(group)
        n = len(group)
        n_val, n_test = round(n * val_fraction), round(n * test_fraction)
        if task == "classification":
            n_val, n_test = max(1, n_val), max(1, n_test)
            if n - n_val - n_test < 1:
                label = y[group[0]] if class_names is None else class_names[y[group[0]]]
                raise DataError(f"data: class {_jsonable(label)!r} has {n} example(s); a stratified "
                                f"train/val/test split needs at least 3")
        parts["val"].append(group[:n_val])
        parts["test"].append(group[n_val:n_val + n_test])
        parts["train"].append(group[n_val + n_test:])
    out = {name: np.sort(np.concatenate(idx)) for name, idx in parts.items()}
    for name, idx in out.items():
        if len(idx) == 0:
            raise DataError(f"data: the {name} split is empty ({len(y)} examples, "
                            f"val_fraction={val_fraction}, test_fraction={test_fraction}); use more data")
    return out


def build(cfg: DataConfig, resolved: Optional[dict] = None, local_file: Optional[Path] = None) -> Dataset:
    """Load, check, split and normalize (statistics from the train split only). A regression
    target is standardized too, so the default LR trains whatever its units (a target of
    25-346 made the loss go 19,730 -> inf in 5 steps); metrics report it back in its units.
    `resolved` (components/data_sources.py) names the source and its version; `local_file` is
    data_prep's checked copy of it."""
    origin = data_sources.describe(resolved) if resolved and resolved["kind"] in ("dvc", "s3") else None
    dataset = build_from(load_source(cfg, local_file, origin), cfg)
    if resolved:
        dataset.manifest["source"] = resolved
        dataset.manifest["data_version"] = resolved["version"] or dataset.manifest["data_version"]
    return dataset


def build_from(source: Source, cfg: DataConfig) -> Dataset:
    if len(source.x) == 0:
        raise DataError(f"data: {source.origin} has no rows")
    present = source.y[~_missing(source.y)]
    if len(present) and (present == present[0]).all():  # before inference: one value is no task at all
        raise DataError(f"data.target: {cfg.target!r} has the same value ({_jsonable(present[0])!r}) in every "
                        f"row of {source.origin}; there is nothing to learn")
    task, task_reason = known_task(cfg), None
    if task is None:
        task, task_reason = infer_task(source.y)
    check_finite(source, task)
    target_scale = None
    if task == "classification":
        classes, y = np.unique(source.y, return_inverse=True)  # at least 2: one value was refused above
        y = y.astype(np.int64)
        if len(classes) > len(y) // 3 and source.y.dtype.kind in "iuf":  # no class could fill 3 splits
            raise DataError(f"data.task: classification, but the target {cfg.target!r} has {len(classes)} distinct "
                            f"values in {len(y)} rows; did you mean data.task=regression?")
        idx = split_indices(y, task, cfg.val_fraction, cfg.test_fraction, cfg.seed, classes)
    else:
        classes, y = None, source.y.astype(np.float64)
        idx = split_indices(y, task, cfg.val_fraction, cfg.test_fraction, cfg.seed)
        mean, std = float(y[idx["train"]].mean()), float(y[idx["train"]].std())
        if std == 0 or std <= 1e-12 * abs(mean):  # the second: float noise around a constant
            raise DataError(f"data.target: {cfg.target!r} is constant on the training split (every value "
                            f"{mean:g}); a regression target must vary")
        y = ((y - mean) / std).astype(np.float32)
        target_scale = {"mean": mean, "std": std}

    flat = source.x.reshape(len(source.x), -1)
    mean = flat[idx["train"]].mean(axis=0)
    std = flat[idx["train"]].std(axis=0)
    std[std < 1e-8] = 1.0  # constant features (e.g. digits' border pixels) stay at zero
    x = ((flat - mean) / std).astype(np.float32).reshape(source.x.shape)

    arrays = {}
    for name in SPLITS:
        arrays[f"x_{name}"] = np.ascontiguousarray(x[idx[name]])
        arrays[f"y_{name}"] = y[idx[name]]
    manifest = {
        "name": cfg.name,
        "origin": source.origin,
        "task": task,
        "task_inferred": task_reason is not None,
        "task_reason": task_reason,  # why it was inferred so; null when the config decided
        "target": cfg.target,
        "target_scale": target_scale,  # regression: arrays hold (y - mean) / std; metrics undo it
        "input_shape": list(source.x.shape[1:]),
        "feature_names": source.feature_names,
        "n_classes": int(len(classes)) if classes is not None else None,
        "classes": [_jsonable(c) for c in classes] if classes is not None else None,
        "counts": {name: int(len(idx[name])) for name in SPLITS},
        "class_balance": ({name: np.bincount(y[idx[name]], minlength=len(classes)).tolist() for name in SPLITS}
                          if classes is not None else None),
        "normalization": {"mean": mean.tolist(), "std": std.tolist()},
        "split": {"val_fraction": cfg.val_fraction, "test_fraction": cfg.test_fraction, "seed": cfg.seed},
    }
    manifest["data_version"] = content_hash(arrays, manifest)
    return Dataset(arrays, manifest)


def _jsonable(value):
    return value.item() if isinstance(value, np.generic) else value


def content_hash(arrays: dict, manifest: dict) -> str:
    h = hashlib.sha256()
    for key in sorted(arrays):
        h.update(key.encode())
        h.update(str(arrays[key].dtype).encode())
        h.update(str(arrays[key].shape).encode())
        h.update(np.ascontiguousarray(arrays[key]).tobytes())
    h.update(json.dumps({k: v for k, v in manifest.items() if k != "data_version"}, sort_keys=True).encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------- the artifact on disk

def save(dataset: Dataset, path: Path) -> None:
    with storage.atomic_dir(path) as tmp:
        np.savez(tmp / "arrays.npz", **dataset.arrays)
        storage.write_json(tmp / "manifest.json", dataset.manifest)


def load(path: Path) -> Dataset:
    path = Path(path)
    with np.load(path / "arrays.npz", allow_pickle=False) as npz:
        arrays = {key: npz[key] for key in npz.keys()}
    return Dataset(arrays, storage.read_json(path / "manifest.json"))
