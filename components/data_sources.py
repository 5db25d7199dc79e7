"""Where a run's data comes from and which version of it a run reads, decided before data_prep.

`resolve(config)` is cheap and reads no data: it returns the resolved source, a JSON-able dict
with `kind` and `version`:
  dvc      the md5 that the .dvc file at the commit data.rev resolves to records (components/dvc_source.py)
  file     a local file's sha256
  s3       an object's VersionId (versioned bucket), else its ETag
  digits, synthetic: version None (data_prep hashes the dataset it builds)
The pipeline's resolve_data step runs it on every run and hands the result to data_prep as a
parameter, so data_prep's cache key changes whenever the data does, and a moving revision never
serves a stale dataset. `fetch` then gives data_prep a local copy of exactly that version, checked.

    python -m components.data_sources --config config.yaml [--out resolved.json]   # the step alone
"""

import argparse
import hashlib
import json
import shutil
from pathlib import Path
from typing import Optional, Tuple

from components import dvc_source
from components.config import StorageConfig, load_config_file
from components.errors import DataError, exit_on_user_error


def storage_settings(config: dict) -> dict:
    """The storage section (conf/storage/) as far as reading data needs it: endpoint_url, region,
    max_attempts, connect_timeout_s. Read with .get, so a config without one works too."""
    return dict(config.get("storage") or {})


def resolve(config: dict) -> dict:
    data, settings = config["data"], storage_settings(config)
    if data["name"] == "dvc":
        resolved = dvc_source.resolve(data, settings)
    elif data["name"] != "file":
        resolved = {"kind": data["name"], "version": None}
    elif data["path"].startswith("s3://"):
        resolved = _resolve_s3(data["path"], settings)
    else:
        path = Path(data["path"]).resolve()
        if not path.is_file():
            raise DataError(f"data.path: no such file: {data['path']}")
        resolved = {"kind": "file", "path": str(path), "version": sha256_of(path)}
    pinned = data.get("version")
    if pinned and resolved["version"] and pinned != resolved["version"]:
        raise DataError(f"data.version: the config says {pinned} but {describe(resolved)} is at "
                        f"{resolved['version']}; unset data.version to take it")
    return resolved


def fetch(config: dict, resolved: dict, scratch: Path) -> Optional[Path]:
    """A local file holding exactly the resolved version (None for generated data)."""
    kind, settings = resolved["kind"], storage_settings(config)
    if kind == "dvc":
        return dvc_source.fetch(resolved, settings, scratch)
    if kind == "s3":
        return _fetch_s3(resolved, settings, scratch)
    if kind == "file":
        path = Path(resolved["path"])
        if not path.is_file():
            raise DataError(f"data.path: no such file: {path}")
        got = sha256_of(path)
        if got != resolved["version"]:
            raise DataError(f"data.path: {path} changed since its version was resolved (sha256 {resolved['version']}"
                            f" -> {got}); run again to read the new one")
        return path
    return None


def describe(resolved: dict) -> str:
    """Where the data came from, in a few words (the dataset manifest's `origin`)."""
    kind = resolved["kind"]
    if kind == "dvc":
        return f"{resolved['path']} at {resolved['commit'][:7]} of {resolved['repo']} (DVC)"
    if kind == "s3":
        return resolved["uri"]
    return resolved.get("path") or kind


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------- s3://

def _split(uri: str) -> Tuple[str, str]:
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not bucket or not key or key.endswith("/"):
        raise DataError(f"data.path: {uri} does not name an object; use s3://bucket/path/to/file.csv")
    return bucket, key


def _client(settings: dict):
    from components import s3

    return s3.make_client(StorageConfig(**settings))


def _s3_error(exc: Exception, uri: str, client, settings: dict) -> DataError:
    """components/s3.py's one line for the error, about data.path; a missing object or bucket
    (a HEAD's 404 says neither) told apart here."""
    from botocore import exceptions as bx

    from components import s3

    bucket, key = _split(uri)
    code = exc.response.get("Error", {}).get("Code", "") if isinstance(exc, bx.ClientError) else ""
    if code in ("404", "NoSuchKey", "NoSuchBucket"):
        try:
            client.head_bucket(Bucket=bucket)
        except bx.ClientError:
            return DataError(f"data.path: bucket {bucket!r} does not exist at {client.meta.endpoint_url}; check the "
                             "URI (or storage.endpoint_url)")
        return DataError(f"data.path: no object {key!r} in bucket {bucket!r} ({uri})")
    return DataError("data.path: " + s3.describe_error(exc, uri, client, StorageConfig(**settings), bucket))


def _resolve_s3(uri: str, settings: dict) -> dict:
    from botocore import exceptions as bx

    bucket, key = _split(uri)
    client = _client(settings)
    try:
        head = client.head_object(Bucket=bucket, Key=key)
    except (bx.BotoCoreError, bx.ClientError) as exc:
        raise _s3_error(exc, uri, client, settings) from None
    version_id = head.get("VersionId") if head.get("VersionId") not in (None, "null") else None
    etag = head["ETag"].strip('"')
    return {"kind": "s3", "uri": uri, "version": version_id or etag, "version_id": version_id, "etag": etag}


def _fetch_s3(resolved: dict, settings: dict, scratch: Path) -> Path:
    """The resolved object version: by VersionId, or only while its ETag is still the resolved one."""
    from botocore import exceptions as bx

    uri = resolved["uri"]
    bucket, key = _split(uri)
    client = _client(settings)
    which = {"VersionId": resolved["version_id"]} if resolved["version_id"] else {"IfMatch": f'"{resolved["etag"]}"'}
    local = Path(scratch) / Path(key).name
    try:
        response = client.get_object(Bucket=bucket, Key=key, **which)
        with open(local, "wb") as f:
            shutil.copyfileobj(response["Body"], f, 1 << 20)
    except bx.ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412"):
            raise DataError(f"data.path: {uri} changed since its version was resolved (ETag {resolved['etag']}); "
                            "run again to read the new one") from None
        raise _s3_error(exc, uri, client, settings) from None
    except bx.BotoCoreError as exc:
        raise _s3_error(exc, uri, client, settings) from None
    if response["ETag"].strip('"') != resolved["etag"]:
        raise DataError(f"data.path: {uri} read as ETag {response['ETag']}, not the resolved {resolved['etag']}")
    return local


@exit_on_user_error
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="resolved config (YAML or JSON)")
    parser.add_argument("--out", help="write the resolved source here (data_prep --resolved reads it)")
    args = parser.parse_args(argv)
    text = json.dumps(resolve(load_config_file(args.config)), indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
