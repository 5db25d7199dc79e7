"""Local files: atomic writes (temp file + rename: a crash never leaves a half-written
checkpoint, summary or dataset behind), strict JSON, checkpoints, metrics rows, and a step's
scratch directory. A run's durable files reach `<output_dir>/<run_id>/`, local or `s3://`,
through components/run_store.py.
"""

import hashlib
import json
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

from components.errors import ConfigError


def local_path(uri: str, key: str = "output_dir") -> Path:
    """The local path of a plain path or file:// URI. Remote locations (s3://) go through
    components/run_store.py, never through here."""
    scheme, sep, _ = str(uri).partition("://")
    if sep and scheme != "file":
        raise ConfigError(f"{key}: {uri} is not a local path; use a local directory here")
    return Path(str(uri)[len("file://"):] if sep else uri)


@contextmanager
def scratch_dir(prefix: str) -> Iterator[Path]:
    """A step's own working directory, in the task's TMPDIR, removed at the end however the step
    ends: what it keeps goes to the run's store (components/run_store.py)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


_UMASK = os.umask(0)
os.umask(_UMASK)


@contextmanager
def atomic_file(path: Path, mode: str = "w") -> Iterator[Any]:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes it 0600: outputs get the permissions open() gives
        with os.fdopen(fd, mode) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


@contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Build a directory under a temp name; it appears at `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_text(path: Path, text: str) -> None:
    with atomic_file(path) as f:
        f.write(text)


def strict(obj: Any) -> Any:
    """`obj` with every NaN/inf float replaced by null, so the file is strict JSON (Python's json
    writes bare NaN tokens that other parsers refuse). In a mapping the reason goes beside it:
    {"r2": null, "r2_note": "non-finite (nan)"}."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        out = {}
        for key, value in obj.items():
            out[key] = strict(value)
            if isinstance(value, float) and not math.isfinite(value):
                out[f"{key}_note"] = f"non-finite ({value})"
        return out
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    return obj


def dumps(obj: Any, **kwargs) -> str:
    """Strict JSON: non-finite floats become null (see `strict`)."""
    return json.dumps(strict(obj), allow_nan=False, **kwargs)


def write_json(path: Path, obj: Any) -> None:
    write_text(path, dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def save_torch(obj: Any, path: Path) -> None:
    import torch

    # Through a file object, not the temp file's name: torch names the archive inside after the
    # file, so a random temp name would make the same weights different bytes (the registry
    # checks a promoted model.pt by its sha256).
    with atomic_file(path, "wb") as f:
        torch.save(obj, f)


def load_torch(path: Path) -> Any:
    import torch

    return torch.load(path, map_location="cpu", weights_only=False)


class JsonlWriter:
    """Append-only rows (metrics.jsonl). `offset()` and `truncate()` let a resumed run drop
    the rows written after its last checkpoint, so no row is ever duplicated.

    Rows reach the file in order on `flush()`, `offset()` and `close()` (or every PENDING_ROWS
    rows), and are formatted then: formatting inside a training step cost several times what it
    costs in a batch afterwards (measured on the digits MLP: ~9 us a row in the loop against ~1 us
    in a batch; the step's tensor work leaves the formatting code cold in the CPU's caches)."""

    PENDING_ROWS = 4096

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a")
        self._pending = []  # (template, values) in write order

    def write(self, row: dict) -> None:
        """`row` as a line of strict JSON. A shallow copy waits to be formatted: change the row
        afterwards and its line does not change (its values are numbers and strings)."""
        self.write_later(None, dict(row))

    def write_later(self, template: Optional[str], values) -> None:
        """The row `template % values` (`template` a line of JSON ending in a newline; None:
        `values` is a dict for `write`), formatted when the rows are next written out."""
        self._pending.append((template, values))
        if len(self._pending) >= self.PENDING_ROWS:
            self._write_pending()

    def _write_pending(self) -> None:
        if self._pending:
            self._f.write("".join([dumps(values) + "\n" if template is None else template % values
                                   for template, values in self._pending]))
            self._pending.clear()

    def flush(self) -> None:
        self._write_pending()
        self._f.flush()

    def offset(self) -> int:
        self.flush()
        return self._f.tell()

    def truncate(self, offset: int) -> None:
        self.flush()
        self._f.truncate(offset)
        self._f.seek(offset)

    def close(self) -> None:
        self._write_pending()
        self._f.close()


def read_jsonl(path: Path) -> list:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def parse_jsonl(data: bytes) -> list:
    """The rows of a metrics.jsonl read from a store."""
    return [json.loads(line) for line in data.decode().splitlines() if line.strip()]
