"""A run's durable files at `<output_dir>/<run_id>/`: a local directory or `s3://bucket/prefix`.

Steps work in their own local scratch directory and hand files to a RunStore:
- `sync` uploads in-progress files (checkpoints/last.pt, metrics.jsonl) at every checkpoint,
  without a manifest, so a retried or preempted pod resumes from the published copy;
- `publish` uploads every file, verifies each, then writes manifest.json LAST. A run is
  visible (`is_published`, `read_manifest`, `fetch`) only once its manifest exists, so a
  failure before it leaves nothing half-published.
- `seal` writes the manifest over what several steps stored (submit's config, the probe's
  probe.json, train's checkpoints and model, evaluate's summary): it lists every stored file,
  size and sha256, and is what the run's last step does.
Keys are relative POSIX paths ("checkpoints/last.pt"); `child("runs/x")` is a store of its own
(a study's runs each have their manifest, the study has one too). A name starting with "." is
never a run file (a temp file, the local runner's `.lock` and `.kfp/` beside a local run).
"""

import hashlib
import json
import os
import tempfile
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Callable, Dict, Iterable, List, Optional

from components import storage
from components.config import StorageConfig
from components.errors import ConfigError, StorageError

MANIFEST = "manifest.json"
Entry = Dict[str, object]  # {"size": bytes, "sha256": hex digest}: what the manifest holds per file


def scheme(uri: str) -> str:
    """'s3', 'file', or '' for a plain path."""
    head, sep, _ = str(uri).partition("://")
    return head if sep else ""


def is_remote(uri: str) -> bool:
    return scheme(uri) not in ("", "file")


def join_uri(base: str, *parts: str) -> str:
    """`base` with path parts appended, '/'-separated for URIs and local paths alike."""
    return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts if p)])


def split_s3(uri: str):
    """s3://bucket/some/prefix -> ("bucket", "some/prefix")."""
    bucket, _, prefix = str(uri)[len("s3://"):].partition("/")
    if not bucket:
        raise ConfigError(f"output_dir: {uri!r} names no bucket; use s3://bucket/prefix")
    return bucket, prefix.strip("/")


def check_key(key: str) -> str:
    """Keys come from code, not users: a bad one is a bug, not bad input."""
    path = PurePosixPath(key)
    if not key or path.is_absolute() or ".." in path.parts or "\\" in key or str(path) != key:
        raise ValueError(f"storage key must be a relative POSIX path without '..'; got {key!r}")
    return key


def describe(path: Path) -> Entry:
    return {"size": Path(path).stat().st_size, "sha256": storage.sha256_file(path)}


def is_run_file(key: str) -> bool:
    """Not a manifest (each store writes its own: a study's runs/*/manifest.json belongs to that
    run) and nothing hidden (atomic_file's temp names, the local runner's .lock and .kfp/)."""
    parts = PurePosixPath(key).parts
    return parts[-1] != MANIFEST and not any(part.startswith(".") for part in parts)


def local_files(local_dir: Path, under: str = "") -> List[str]:
    """Every run file under local_dir (or its subdirectory `under`) as a key. Symlinks are left
    out: W&B's (wandb/debug.log, latest-run) point at files listed already."""
    local_dir = Path(local_dir)
    top = local_dir / under if under else local_dir
    keys = (p.relative_to(local_dir).as_posix() for p in top.rglob("*") if p.is_file() and not p.is_symlink())
    return sorted(k for k in keys if is_run_file(k))


def run_uri(config: dict) -> str:
    """`<output_dir>/<run_id>`: where a run's durable files go (run_id decided, see
    components.config.with_run_id)."""
    if not config.get("run_id"):
        raise ValueError("run_uri: the config has no run_id yet (components.config.with_run_id decides it)")
    return join_uri(config["output_dir"], config["run_id"])


def settings_of(config: dict) -> StorageConfig:
    return StorageConfig(**(config.get("storage") or {}))


def open_run(config: dict, where=None) -> "RunStore":
    """The run's store: `where` (a RunStore, or a URI: a local path or s3://) or, when None,
    `<output_dir>/<run_id>` of the config, with the config's storage settings."""
    if isinstance(where, RunStore):
        return where
    return RunStore.open(str(where) if where is not None else run_uri(config), settings_of(config))


def checksum_error(uri: str, expected: str, got: str) -> StorageError:
    return StorageError(f"{uri}: checksum mismatch (sha256 expected {expected}, got {got}); the stored copy "
                        "is corrupt or was overwritten: publish the run again")


class RunStore:
    """Shared semantics over two backends; subclasses supply the primitives marked below."""

    def __init__(self, uri: str, settings: StorageConfig):
        self.uri, self.settings = str(uri).rstrip("/"), settings
        self.uploads: Counter = Counter()  # key -> times its bytes were sent (sync skips unchanged files)
        self._synced: Dict[str, Entry] = {}  # key -> what this process last stored there

    @staticmethod
    def open(uri: str, settings: Optional[StorageConfig] = None) -> "RunStore":
        settings = settings or StorageConfig()
        kind = scheme(uri)
        if kind == "s3":
            from components.s3 import S3Store

            return S3Store(uri, settings)
        if kind in ("", "file"):
            from components.local_store import LocalStore

            return LocalStore(uri, settings)
        raise ConfigError(f"output_dir: {kind}:// is not supported; use a local path or s3://bucket/prefix")

    def child(self, path: str) -> "RunStore":
        raise NotImplementedError

    # -- primitives --------------------------------------------------------------------------
    def _put(self, local_path: Path, key: str, entry: Entry) -> None:
        """Store the file's bytes at key (entry: its size and sha256, already computed)."""
        raise NotImplementedError

    def _download(self, key: str, dest: Path) -> Optional[str]:
        """Copy key's bytes to dest; return the sha256 the backend stored with them, if any."""
        raise NotImplementedError

    def _read(self, key: str) -> Optional[bytes]:
        """key's bytes, or None when there is no such object."""
        raise NotImplementedError

    def _stat(self, key: str) -> Optional[Entry]:
        """What is stored at key (size and sha256), or None."""
        raise NotImplementedError

    def put_bytes(self, key: str, data: bytes) -> None:
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        raise NotImplementedError

    def list(self, prefix: str = "") -> List[str]:
        """Sorted keys that start with prefix."""
        raise NotImplementedError

    def delete(self, key: str) -> None:
        raise NotImplementedError

    def _same_file(self, local_path: Path, key: str) -> bool:
        """local_path IS the stored copy (a local store publishing its own directory)."""
        return False

    # -- files, bytes, JSON ------------------------------------------------------------------
    def put_file(self, local_path: Path, key: str) -> Entry:
        entry = describe(local_path)
        self._put(Path(local_path), check_key(key), entry)
        self._synced[key] = entry
        return entry

    def get_file(self, key: str, local_path: Path, sha256: Optional[str] = None) -> None:
        """Download key to local_path, verified against sha256 (or, on S3, the one stored with the object);
        a corrupt copy never lands at local_path."""
        local_path = Path(local_path)
        if self._same_file(local_path, check_key(key)):
            got = storage.sha256_file(local_path)
            if sha256 is not None and got != sha256:
                raise checksum_error(join_uri(self.uri, key), sha256, got)
            return
        local_path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=local_path.parent, prefix=f".{local_path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            stored = self._download(key, Path(tmp))
            expected, got = sha256 or stored, storage.sha256_file(tmp)
            if expected is not None and got != expected:
                raise checksum_error(join_uri(self.uri, key), expected, got)
            os.replace(tmp, local_path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get_bytes(self, key: str) -> bytes:
        data = self._read(check_key(key))
        if data is None:
            raise StorageError(f"{join_uri(self.uri, key)}: not found; check the run id and output_dir")
        return data

    def put_json(self, key: str, obj) -> None:
        self.put_bytes(key, (storage.dumps(obj, indent=2) + "\n").encode())

    def get_json(self, key: str):
        return _parse_json(self.get_bytes(key), join_uri(self.uri, key))

    # -- runs ----------------------------------------------------------------------------------
    def sync(self, local_dir: Path, keys: Iterable[str]) -> List[str]:
        """Upload the files among keys that changed since this store last stored them (size and
        sha256); no manifest. S3 cannot append, so metrics.jsonl goes up whole each time: it is
        small next to a checkpoint. Returns the keys uploaded."""
        uploaded = []
        for key in keys:
            path = Path(local_dir) / check_key(key)
            entry = describe(path)
            if self._synced.get(key) != entry:
                self._put(path, key, entry)
                self._synced[key] = entry
                uploaded.append(key)
        return uploaded

    def publish(self, local_dir: Path, keys: Optional[Iterable[str]] = None, extra: Optional[dict] = None,
                on_stored: Optional[Callable[[str], None]] = None) -> dict:
        """Upload every file under local_dir (or keys), verify each, then write the manifest last:
        {files: {key: {size, sha256}}, published_at, **extra}. A file already stored with the same
        size and sha256 (synced) is not sent again. `on_stored(key)` runs after each verified file.
        Re-publishing first removes the old manifest, so none ever lists files being replaced."""
        local_dir = Path(local_dir)
        keys = local_files(local_dir) if keys is None else sorted(set(keys))
        clash = {"files", "published_at"} & set(extra or {})
        if clash or MANIFEST in keys:
            raise ValueError(f"publish: {sorted(clash) or MANIFEST} is the manifest's own")
        files = {}
        for key in keys:
            path = local_dir / check_key(key)
            if not path.is_file():
                raise StorageError(f"{path}: no such file to publish as {join_uri(self.uri, key)}; "
                                   "nothing was published")
            files[key] = describe(path)
        self.delete(MANIFEST)
        for key, entry in files.items():
            if self._stat(key) != entry:
                self._put(local_dir / key, key, entry)
                stored = self._stat(key)
                if stored != entry:
                    raise StorageError(f"{join_uri(self.uri, key)}: stored {stored} after uploading {entry}; "
                                       "nothing was published, publish again")
            self._synced[key] = entry
            if on_stored:
                on_stored(key)
        manifest = {"files": files, "published_at": datetime.now(timezone.utc).isoformat(), **(extra or {})}
        self.put_json(MANIFEST, manifest)
        return manifest

    def seal(self, extra: Optional[dict] = None) -> dict:
        """Publish what is stored already: the manifest lists every run file under this store (its
        children's too, without their manifests), each with its size and the sha256 stored with it,
        and is written last. The run's final step calls it over the files earlier steps stored."""
        clash = {"files", "published_at"} & set(extra or {})
        if clash:
            raise ValueError(f"seal: {sorted(clash)} is the manifest's own")
        files = {}
        for key in self.list():
            if not is_run_file(key):
                continue
            entry = self._stat(key)
            if entry is None or entry["sha256"] is None:  # gone meanwhile, or not stored by us
                raise StorageError(f"{join_uri(self.uri, key)}: no sha256 stored with it; store it again "
                                   "through the run's step, then seal")
            files[key] = entry
        manifest = {"files": files, "published_at": datetime.now(timezone.utc).isoformat(), **(extra or {})}
        self.put_json(MANIFEST, manifest)
        return manifest

    def unpublish(self) -> None:
        """Hide a published run before its files change (a resumed or retried run): a manifest
        never lists files being replaced. Sealing it again makes it visible."""
        self.delete(MANIFEST)

    def read_published(self, key: str, manifest: Optional[dict] = None) -> bytes:
        """key's bytes as the manifest lists them, verified against its sha256."""
        manifest = manifest or self.read_manifest()
        if manifest is None:
            raise StorageError(f"{self.uri}: not published (no {MANIFEST}); check the run id, or publish it first")
        entry = manifest["files"].get(key)
        if entry is None:
            raise StorageError(f"{join_uri(self.uri, key)}: not in the run's manifest "
                               f"(it lists {', '.join(sorted(manifest['files'])) or 'nothing'})")
        data = self.get_bytes(key)
        got = hashlib.sha256(data).hexdigest()
        if got != entry["sha256"]:
            raise checksum_error(join_uri(self.uri, key), entry["sha256"], got)
        return data

    def read_manifest(self) -> Optional[dict]:
        data = self._read(MANIFEST)
        return None if data is None else _parse_json(data, join_uri(self.uri, MANIFEST))

    def is_published(self) -> bool:
        return self.exists(MANIFEST)

    def fetch(self, local_dir: Path, keys: Optional[Iterable[str]] = None) -> dict:
        """Download what the manifest lists (or keys of it) into local_dir, each verified against
        the manifest's sha256. Returns the manifest."""
        manifest = self.read_manifest()
        if manifest is None:
            raise StorageError(f"{self.uri}: not published (no {MANIFEST}); check the run id, or publish it first")
        files = manifest["files"]
        wanted = sorted(files) if keys is None else list(keys)
        unknown = [key for key in wanted if key not in files]
        if unknown:
            raise StorageError(f"{join_uri(self.uri, unknown[0])}: not in the run's manifest "
                               f"(it lists {', '.join(sorted(files)) or 'nothing'})")
        for key in wanted:
            self.get_file(key, Path(local_dir) / key, sha256=files[key]["sha256"])
        return manifest

    # -- conditional writes: what components/registry.py builds its pointer and history on ----
    def create_bytes(self, key: str, data: bytes) -> bool:
        """Store data at key only if nothing is there, atomically; False when something is (another
        writer got there first). Readers never see part of it."""
        raise NotImplementedError

    def read_tagged(self, key: str) -> Optional[tuple]:
        """(bytes, tag) of key, or None: the tag changes whenever the bytes are replaced (S3: the ETag)."""
        raise NotImplementedError

    def replace_bytes(self, key: str, data: bytes, tag: str) -> bool:
        """Store data at key only if the object there still has `tag` (from read_tagged), atomically;
        False when it changed or is gone."""
        raise NotImplementedError


def _parse_json(data: bytes, uri: str):
    try:
        return json.loads(data)
    except ValueError as exc:
        raise StorageError(f"{uri}: not valid JSON ({exc}); publish the run again") from None
