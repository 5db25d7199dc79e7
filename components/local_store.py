"""The local-directory backend of components/run_store.py (the S3 one is components/s3.py).

Writes are atomic (temp file + os.replace), the manifest last. When the store IS the directory
being published (the local runner's default), files stay where they are."""

import fcntl
import hashlib
import os
import shutil
import uuid
from pathlib import Path, PurePosixPath
from typing import List, Optional

from components import storage
from components.config import StorageConfig
from components.errors import StorageError
from components.run_store import Entry, RunStore, check_key, describe, join_uri


class LocalStore(RunStore):
    """A directory. Writes are atomic (temp file + os.replace), the manifest last. When the store
    IS the directory being published (the local runner's default), files stay where they are."""

    def __init__(self, uri: str, settings: StorageConfig):
        super().__init__(uri, settings)
        self.root = storage.local_path(self.uri)

    def child(self, path: str) -> "LocalStore":
        return LocalStore(join_uri(self.uri, path), self.settings)

    def _path(self, key: str) -> Path:
        return self.root / key

    def _same_file(self, local_path: Path, key: str) -> bool:
        target = self._path(key)
        return Path(local_path).exists() and target.exists() and os.path.samefile(local_path, target)

    def _put(self, local_path: Path, key: str, entry: Entry) -> None:
        if self._same_file(local_path, key):
            return
        with open(local_path, "rb") as src, storage.atomic_file(self._path(key), "wb") as dst:
            shutil.copyfileobj(src, dst)
        self.uploads[key] += 1

    def _download(self, key: str, dest: Path) -> Optional[str]:
        try:
            shutil.copyfile(self._path(key), dest)
        except FileNotFoundError:
            raise StorageError(f"{join_uri(self.uri, key)}: not found; check the run id and output_dir") from None
        return None

    def _read(self, key: str) -> Optional[bytes]:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            return None

    def _stat(self, key: str) -> Optional[Entry]:
        path = self._path(key)
        return describe(path) if path.is_file() else None

    def put_bytes(self, key: str, data: bytes) -> None:
        with storage.atomic_file(self._path(check_key(key)), "wb") as f:
            f.write(data)
        self.uploads[key] += 1

    def exists(self, key: str) -> bool:
        return self._path(check_key(key)).is_file()

    def list(self, prefix: str = "") -> List[str]:
        """Sorted keys under prefix: manifests included, hidden entries (temp files, the local
        runner's .lock and .kfp/) never."""
        if not self.root.is_dir():
            return []
        keys = [p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file()]
        return sorted(k for k in keys if k.startswith(prefix)
                      and not any(part.startswith(".") for part in PurePosixPath(k).parts))

    def delete(self, key: str) -> None:
        self._path(check_key(key)).unlink(missing_ok=True)

    def create_bytes(self, key: str, data: bytes) -> bool:
        # write a temp file whole, then link it to the key: link(2) fails if the name exists, so
        # of two creators exactly one wins, and the file appears complete
        path = self._path(check_key(key))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.new"  # this writer's own: hidden, never listed
        with storage.atomic_file(tmp, "wb") as f:
            f.write(data)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
        self.uploads[key] += 1
        return True

    def read_tagged(self, key: str) -> Optional[tuple]:
        data = self._read(check_key(key))
        return None if data is None else (data, hashlib.sha256(data).hexdigest())

    def replace_bytes(self, key: str, data: bytes, tag: str) -> bool:
        # compare and replace under an exclusive lock on a hidden lock file beside the key (flock:
        # one machine's processes; every replacer of this key goes through it)
        path = self._path(check_key(key))
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.parent / f".{path.name}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            current = self.read_tagged(key)
            if current is None or current[1] != tag:
                return False
            self.put_bytes(key, data)
        return True
