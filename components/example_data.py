"""The project's example data: scikit-learn's digits as data/digits.csv, tracked by DVC (data.dvc).

    python -m components.example_data      # `make run` and `make test` do this first

A fresh clone has data.dvc but neither the data nor a DVC remote. This puts data/ in place (pulled
with DVC when the project has a default remote, generated here otherwise: the CSV is the same bytes
on every machine), checks it against the md5 in data.dvc with DVC's own hashing (what `dvc status`
compares), and commits it to the DVC cache, from where the default run reads it through DVC at the
checkout's HEAD (conf/data/example.yaml). A data/ that does not match is refused, never overwritten.
"""

import argparse
from pathlib import Path

from components.errors import DataError, exit_on_user_error

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = "data"
DVC_FILE = "data.dvc"
CSV_NAME = "digits.csv"
SIDE = 8  # digits are 8x8 images


def digits_csv() -> bytes:
    """64 pixel columns (row-major, pixel_<row>_<col>) and `target`, one row per image. The pixels
    are integers 0-16, written as integers, so no float formatting can differ between machines."""
    import numpy as np
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = digits.data.astype(np.int64)
    assert np.array_equal(pixels, digits.data), "digits' pixels are integer intensities"
    header = [f"pixel_{r}_{c}" for r in range(SIDE) for c in range(SIDE)] + ["target"]
    rows = [",".join(map(str, row)) + f",{label}" for row, label in zip(pixels.tolist(), digits.target.tolist())]
    return ("\n".join([",".join(header), *rows]) + "\n").encode("ascii")


def _output(repo):
    """data.dvc's one output (data/)."""
    (stage,) = repo.stage.collect(str(Path(repo.root_dir) / DVC_FILE))  # absolute: DVC reads targets from the cwd
    (out,) = stage.outs
    return out


def _default_remote(repo):
    return repo.config["core"].get("remote")


def _pull(repo, remote: str) -> str:
    """Pull data/ from the default remote; a note on failure (the data can still be generated)."""
    try:
        repo.pull(targets=[str(Path(repo.root_dir) / DVC_FILE)])
        return f"pulled from DVC remote {remote!r}"
    except Exception as exc:  # noqa: BLE001 - any remote failure: fall back to generating it
        reason = " ".join(str(exc).split()) or type(exc).__name__
        return f"could not pull from DVC remote {remote!r} ({reason}); generated it instead"


def ensure(root: Path = PROJECT_ROOT) -> str:
    """Put the example data in place and in the DVC cache; returns a line saying how. Raises
    DataError (one line, both hashes) when data/ does not hash to data.dvc's md5."""
    from dvc.repo import Repo

    root = Path(root)
    data_dir = root / DATA_DIR
    with Repo(str(root)) as repo:
        out = _output(repo)
        expected = out.hash_info.value
        how = "in place"
        if not data_dir.exists():
            remote = _default_remote(repo)
            how = _pull(repo, remote) if remote else "generated"
            if not (data_dir / CSV_NAME).exists():
                data_dir.mkdir(exist_ok=True)
                (data_dir / CSV_NAME).write_bytes(digits_csv())
        actual = out.get_hash().value
        if actual != expected:
            raise DataError(f"data: {data_dir} has md5 {actual} but {DVC_FILE} records {expected}; the example data "
                            f"was changed or generated differently: delete {data_dir} and run "
                            "`python -m components.example_data` again (or `dvc pull`)")
        if out.changed_cache():
            out.commit(relink=False)  # the default run reads it through DVC at HEAD: from the cache
    return f"example data {data_dir / CSV_NAME}: md5 {expected} ({DVC_FILE}), {how}"


@exit_on_user_error
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=str(PROJECT_ROOT), help="the project checkout (default: this one)")
    args = parser.parse_args(argv)
    print(ensure(Path(args.root)), flush=True)


if __name__ == "__main__":
    main()
