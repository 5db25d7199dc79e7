"""The storage layer for a run's durable files: a local directory and S3 (a real moto_server on
127.0.0.1, see conftest.py), with the same semantics: sync without a manifest, publish with the
manifest last, fetch verified by sha256, and one-line errors."""

import base64
import hashlib
import os
import socket
import time

import boto3
import pytest
import requests

from components.config import StorageConfig, config_hash, parse_config
from components.errors import ERROR_MARKER, ConfigError, StorageError, user_errors_as_one_line
from components import run_store
from components.run_store import MANIFEST, RunStore, is_remote, join_uri, split_s3
from pipelines.config import compose_config
from tests.conftest import config, free_port

# Short timeouts and 2 attempts: a test of an unreachable endpoint takes a second, not minutes.
FAST = dict(region="us-east-1", max_attempts=2, connect_timeout_s=1.0, read_timeout_s=2.0, multipart_threshold_mb=5)
RUN_FILES = {
    "config.yaml": b"train:\n  batch_size: 32\n",
    "summary.json": b'{"status": "trained"}\n',
    "metrics.jsonl": b'{"step": 1, "train/loss": 2.3}\n',
    "checkpoints/last.pt": os.urandom(200_000),
    "wandb/offline-run-1/run-1.wandb": os.urandom(3000),
}


def settings(server=None, **overrides) -> StorageConfig:
    return StorageConfig(**{**FAST, "endpoint_url": server.endpoint_url if server else None, **overrides})


def write_run(local_dir, files=RUN_FILES):
    for key, data in files.items():
        path = local_dir / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return local_dir


def entry(data: bytes) -> dict:
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return RunStore.open(str(tmp_path / "out" / "run-1"), settings())
    server, bucket = request.getfixturevalue("s3_server"), request.getfixturevalue("s3_bucket")
    return RunStore.open(f"s3://{bucket}/out/run-1", settings(server))


def overwrite_stored(store, key: str, data: bytes) -> None:
    """Someone else's write to the stored copy (not through the store)."""
    if is_remote(store.uri):
        store.client.put_object(Bucket=store.bucket, Key=store._object(key), Body=data)
    else:
        (store.root / key).write_bytes(data)


def test_publish_then_fetch_round_trips_every_byte_and_the_manifest_lists_each_file(store, tmp_path):
    manifest = store.publish(write_run(tmp_path / "scratch"), extra={"status": "trained", "lineage": {"data": "md5"}})
    assert manifest["files"] == {key: entry(data) for key, data in RUN_FILES.items()}
    assert manifest["status"] == "trained" and manifest["lineage"] == {"data": "md5"} and manifest["published_at"]
    assert store.read_manifest() == manifest and store.is_published()
    assert store.list() == sorted([*RUN_FILES, MANIFEST])
    assert store.list("checkpoints/") == ["checkpoints/last.pt"]

    assert store.fetch(tmp_path / "reader") == manifest
    for key, data in RUN_FILES.items():
        assert (tmp_path / "reader" / key).read_bytes() == data
    assert store.fetch(tmp_path / "one", keys=["summary.json"]) == manifest
    assert [p.name for p in (tmp_path / "one").rglob("*")] == ["summary.json"]


def test_the_manifest_is_written_last_and_a_failure_midway_leaves_none(store, tmp_path):
    scratch = write_run(tmp_path / "scratch")
    seen = []
    store.publish(scratch, on_stored=lambda key: seen.append((key, store.is_published())))
    assert seen == [(key, False) for key in sorted(RUN_FILES)] and store.is_published()

    def fail_after_two(key):
        if len(stored) == 1:
            raise RuntimeError("pod preempted")
        stored.append(key)

    stored = []
    (scratch / "summary.json").write_bytes(b'{"status": "evaluated"}\n')
    with pytest.raises(RuntimeError, match="pod preempted"):
        store.publish(scratch, on_stored=fail_after_two)
    # the old manifest went first (it would list a summary being replaced), the new one never came
    assert not store.is_published() and store.read_manifest() is None
    assert set(RUN_FILES) <= set(store.list())  # the files are there, invisible without a manifest
    with pytest.raises(StorageError) as err:
        store.fetch(tmp_path / "reader")
    assert str(err.value) == f"{store.uri}: not published (no manifest.json); check the run id, or publish it first"

    store.publish(scratch)
    assert store.fetch(tmp_path / "reader")["files"]["summary.json"] == entry(b'{"status": "evaluated"}\n')

    with pytest.raises(StorageError) as err:  # checked before anything is touched: the run stays visible
        store.publish(scratch, keys=["summary.json", "model.pt"])
    assert str(err.value) == (f"{scratch / 'model.pt'}: no such file to publish as {store.uri}/model.pt; "
                              "nothing was published")
    assert store.is_published()


def test_republishing_sends_only_changed_files_and_replaces_the_manifest(store, tmp_path):
    scratch = write_run(tmp_path / "scratch")
    first = store.publish(scratch, extra={"status": "running"})
    (scratch / "metrics.jsonl").write_bytes(RUN_FILES["metrics.jsonl"] + b'{"step": 2, "train/loss": 1.9}\n')
    second = store.publish(scratch, extra={"status": "trained"})
    assert store.read_manifest() == second and second["status"] == "trained"
    assert second["files"]["metrics.jsonl"] != first["files"]["metrics.jsonl"]
    assert store.uploads == {**{key: 1 for key in RUN_FILES}, "metrics.jsonl": 2, MANIFEST: 2}
    store.fetch(tmp_path / "reader")
    assert (tmp_path / "reader" / "metrics.jsonl").read_bytes() == (scratch / "metrics.jsonl").read_bytes()


def test_sync_uploads_only_changed_files_without_a_manifest_and_a_new_pod_resumes_from_it(store, tmp_path):
    scratch = write_run(tmp_path / "scratch")
    in_progress = ["checkpoints/last.pt", "metrics.jsonl"]
    assert store.sync(scratch, in_progress) == in_progress
    assert store.sync(scratch, in_progress) == []  # nothing changed since
    with open(scratch / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 2, "train/loss": 1.9}\n')
    assert store.sync(scratch, in_progress) == ["metrics.jsonl"]
    assert store.uploads == {"checkpoints/last.pt": 1, "metrics.jsonl": 2}
    assert not store.is_published()

    # a retried pod: a new store object, a new scratch directory, the published copies
    pod = RunStore.open(store.uri, store.settings)
    for key in in_progress:
        pod.get_file(key, tmp_path / "pod" / key)
        assert (tmp_path / "pod" / key).read_bytes() == (scratch / key).read_bytes()  # metrics went up whole

    assert pod.exists("metrics.jsonl") and not pod.exists("model.pt")
    with pytest.raises(StorageError) as err:
        pod.get_file("model.pt", tmp_path / "pod" / "model.pt")
    assert str(err.value) == f"{store.uri}/model.pt: not found; check the run id and output_dir"

    store.publish(scratch)  # the synced checkpoint is already stored: not sent again
    assert store.uploads["checkpoints/last.pt"] == 1 and store.is_published()


def test_a_corrupted_object_fails_fetch_in_one_line_naming_the_key_and_both_hashes(store, tmp_path):
    store.publish(write_run(tmp_path / "scratch"))
    overwrite_stored(store, "checkpoints/last.pt", b"bit rot")
    with pytest.raises(StorageError) as err:
        store.fetch(tmp_path / "reader")
    good, bad = entry(RUN_FILES["checkpoints/last.pt"])["sha256"], hashlib.sha256(b"bit rot").hexdigest()
    assert str(err.value) == (f"{store.uri}/checkpoints/last.pt: checksum mismatch (sha256 expected {good}, "
                              f"got {bad}); the stored copy is corrupt or was overwritten: publish the run again")
    # the corrupt bytes never land under the real name, and no temp file is left
    assert [p for p in (tmp_path / "reader").rglob("*") if p.is_file()] == []


def test_child_stores_have_their_own_manifests_inside_the_parents(store, tmp_path):
    run = store.child("runs/b32-lr1x-s0")
    assert run.uri == f"{store.uri}/runs/b32-lr1x-s0"
    study_dir = tmp_path / "study"
    run.publish(write_run(study_dir / "runs" / "b32-lr1x-s0", {"metrics.jsonl": b"{}\n"}))
    (study_dir / "runs" / "b32-lr1x-s0" / MANIFEST).write_text("{}")  # as a local runner's run dir would hold
    write_run(study_dir, {"study.json": b"{}\n"})
    study = store.publish(study_dir)
    # the run's manifest is the run's own: the study lists the run's files, not its manifest
    assert sorted(study["files"]) == ["runs/b32-lr1x-s0/metrics.jsonl", "study.json"]
    assert run.read_manifest()["files"] == {"metrics.jsonl": entry(b"{}\n")}
    assert store.list("runs/") == ["runs/b32-lr1x-s0/manifest.json", "runs/b32-lr1x-s0/metrics.jsonl"]


def test_seal_lists_what_several_steps_stored_and_read_published_verifies_it(store, tmp_path):
    """The pipeline's way: each step stores its files (put, sync), the last step seals the run."""
    scratch = write_run(tmp_path / "scratch")
    store.put_file(scratch / "config.yaml", "config.yaml")  # submit
    store.sync(scratch, ["metrics.jsonl", "checkpoints/last.pt"])  # train, at a checkpoint
    store.sync(scratch, run_store.local_files(scratch, "wandb"))  # train, at the end
    store.put_json("summary.json", {"status": "trained"})  # evaluate
    run = store.child("runs/b32")  # a study's run, sealed on its own
    run.put_bytes("metrics.jsonl", b"{}\n")
    run.seal({"status": "completed"})
    assert not store.is_published()  # stored is not visible

    manifest = store.seal({"status": "completed", "lineage": {"data": "md5"}})
    stored = {**RUN_FILES, "summary.json": b'{\n  "status": "trained"\n}\n', "runs/b32/metrics.jsonl": b"{}\n"}
    assert manifest["files"] == {key: entry(data) for key, data in stored.items()}  # no manifest, not the run's
    assert store.read_manifest() == manifest and manifest["status"] == "completed"
    assert store.read_published("checkpoints/last.pt") == RUN_FILES["checkpoints/last.pt"]
    assert run.read_manifest()["files"] == {"metrics.jsonl": entry(b"{}\n")}

    overwrite_stored(store, "metrics.jsonl", b"rewritten")  # someone wrote around the store
    with pytest.raises(StorageError, match="metrics.jsonl: checksum mismatch"):
        store.read_published("metrics.jsonl")
    with pytest.raises(StorageError, match="model.pt: not in the run's manifest"):
        store.read_published("model.pt")
    store.unpublish()  # a resumed run hides itself before its files change
    assert not store.is_published() and store.exists("metrics.jsonl")
    with pytest.raises(StorageError, match="not published"):
        store.read_published("metrics.jsonl")


def test_a_local_run_directory_s_hidden_entries_are_not_run_files(tmp_path):
    """Beside a local run: the local runner's .lock and .kfp/ (task artifacts, the steps' scratch)."""
    run_dir = write_run(tmp_path / "runs" / "r1", {"summary.json": b"{}", ".lock": b"pid",
                                                   ".kfp/tmp/train-x/metrics.jsonl": b"scratch",
                                                   "wandb/.hidden": b"x"})
    store = RunStore.open(str(run_dir), settings())
    assert store.list() == ["summary.json"] == run_store.local_files(run_dir)
    assert list(store.seal()["files"]) == ["summary.json"]


def test_a_local_store_publishing_its_own_directory_copies_nothing_onto_itself(tmp_path):
    run_dir = write_run(tmp_path / "runs" / "r1")
    inode = os.stat(run_dir / "checkpoints" / "last.pt").st_ino
    store = RunStore.open(str(run_dir), settings())
    assert store.sync(run_dir, ["checkpoints/last.pt"]) == ["checkpoints/last.pt"]
    manifest = store.publish(run_dir, extra={"status": "trained"})
    assert store.uploads == {MANIFEST: 1}  # only the manifest was written
    assert os.stat(run_dir / "checkpoints" / "last.pt").st_ino == inode
    assert manifest["files"] == {key: entry(data) for key, data in RUN_FILES.items()}
    assert store.fetch(run_dir) == manifest  # verifies in place
    (run_dir / "summary.json").write_bytes(b"{}")
    with pytest.raises(StorageError, match="summary.json: checksum mismatch"):
        store.fetch(run_dir)
    assert RunStore.open(f"file://{run_dir}", settings()).read_manifest() == manifest


def test_a_large_file_uploads_in_parts_and_round_trips(s3_server, s3_bucket, tmp_path):
    files = {"model.pt": os.urandom(12 * 1024 * 1024), "small.json": b"{}\n"}
    store = RunStore.open(f"s3://{s3_bucket}/r", settings(s3_server, multipart_threshold_mb=5))
    store.publish(write_run(tmp_path / "scratch", files))
    client = s3_server.client()
    big = client.head_object(Bucket=s3_bucket, Key="r/model.pt")
    assert big["ETag"].strip('"').endswith("-3")  # 12 MiB in 5 MiB parts
    assert big["Metadata"] == {"sha256": entry(files["model.pt"])["sha256"]}
    small = client.head_object(Bucket=s3_bucket, Key="r/small.json", ChecksumMode="ENABLED")
    assert "-" not in small["ETag"]  # one PUT, with S3's own SHA256 checksum asked for
    assert small["ChecksumSHA256"] == base64.b64encode(hashlib.sha256(files["small.json"]).digest()).decode()
    store.fetch(tmp_path / "reader")
    assert (tmp_path / "reader" / "model.pt").read_bytes() == files["model.pt"]


def test_an_endpoint_killed_mid_publish_leaves_no_run_and_a_retry_publishes_it_whole(s3_server, s3_bucket, tmp_path):
    store = RunStore.open(f"s3://{s3_bucket}/run-1", settings(s3_server))
    scratch = write_run(tmp_path / "scratch")
    started = time.perf_counter()
    try:
        with pytest.raises(StorageError) as err:
            store.publish(scratch, on_stored=lambda key: s3_server.stop())  # dies after the first file
        elapsed = time.perf_counter() - started
    finally:
        s3_server.start()  # on the same port, empty: moto keeps buckets in memory
    second = sorted(RUN_FILES)[1]
    assert str(err.value) == (f"s3://{s3_bucket}/run-1/{second}: cannot reach the S3 endpoint {s3_server.endpoint_url} "
                              "(2 attempts); check storage.endpoint_url and that the server is up")
    assert elapsed < 10
    s3_server.client().create_bucket(Bucket=s3_bucket)
    assert not store.is_published()
    manifest = store.publish(scratch)  # the same store object: its memory of what was stored is not trusted
    assert store.fetch(tmp_path / "reader") == manifest
    assert all((tmp_path / "reader" / key).read_bytes() == data for key, data in RUN_FILES.items())


@pytest.fixture
def s3_auth(s3_server, s3_bucket):
    """moto_server checking signatures and IAM policies (it accepts anything by default): a user
    'nobody' with real keys and no policy. The bucket is made before; checks go off after the test."""
    iam = boto3.client("iam", endpoint_url=s3_server.endpoint_url, region_name="us-east-1")
    user = f"nobody-{free_port()}"
    iam.create_user(UserName=user)
    key = iam.create_access_key(UserName=user)["AccessKey"]
    requests.post(f"{s3_server.endpoint_url}/moto-api/reset-auth", data=b"0", timeout=5).raise_for_status()
    try:
        yield key["AccessKeyId"], key["SecretAccessKey"]
    finally:
        requests.post(f"{s3_server.endpoint_url}/moto-api/reset-auth", data=b"inf", timeout=5).raise_for_status()


@pytest.mark.parametrize("who, message", [
    ("unknown key", "the credentials were refused (InvalidAccessKeyId); check AWS_ACCESS_KEY_ID "
                    "(or AWS_PROFILE, AWS_SESSION_TOKEN) for this endpoint"),
    ("wrong secret", "the secret key does not match the access key id (SignatureDoesNotMatch); "
                     "check AWS_SECRET_ACCESS_KEY"),
    ("no permission", "access denied (AccessDenied); the credentials lack permission on bucket '{bucket}': "
                      "check its policy and the IAM user's"),
])
def test_refused_credentials_fail_in_one_line_before_anything_is_published(s3_server, s3_bucket, s3_auth, tmp_path,
                                                                           monkeypatch, who, message):
    key_id, secret = {"unknown key": ("AKIAUNKNOWN000000000", "x"), "wrong secret": (s3_auth[0], "wrong"),
                      "no permission": s3_auth}[who]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    store = RunStore.open(f"s3://{s3_bucket}/run-1", settings(s3_server))
    with pytest.raises(StorageError) as err:
        store.publish(write_run(tmp_path / "scratch"))
    assert str(err.value) == f"s3://{s3_bucket}/run-1/manifest.json: " + message.format(bucket=s3_bucket)
    with pytest.raises(StorageError) as err:
        store.get_file("checkpoints/last.pt", tmp_path / "pod" / "last.pt")
    assert str(err.value) == f"s3://{s3_bucket}/run-1/checkpoints/last.pt: " + message.format(bucket=s3_bucket)


def test_a_missing_bucket_is_one_marked_line_and_exit_2(s3_server, tmp_path, capsys):
    store = RunStore.open("s3://no-such-bucket/run-1", settings(s3_server))
    with pytest.raises(SystemExit) as exit_, user_errors_as_one_line():
        store.publish(write_run(tmp_path / "scratch"))
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"{ERROR_MARKER} s3://no-such-bucket/run-1/manifest.json: bucket 'no-such-bucket' does not exist at "
        f"{s3_server.endpoint_url}; create it or fix output_dir"]
    assert (tmp_path / "scratch" / "checkpoints" / "last.pt").read_bytes() == RUN_FILES["checkpoints/last.pt"]


def test_no_credentials_at_all_is_one_line(s3_server, s3_bucket, tmp_path, monkeypatch):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-role lookup off this machine
    store = RunStore.open(f"s3://{s3_bucket}/run-1", settings(s3_server))
    with pytest.raises(StorageError) as err:
        store.is_published()
    assert str(err.value) == (f"s3://{s3_bucket}/run-1: no AWS credentials found; set AWS_ACCESS_KEY_ID and "
                              "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) in the environment of every step")


def test_an_endpoint_with_nothing_listening_fails_fast_in_one_line(s3_server, tmp_path):
    endpoint = f"http://127.0.0.1:{free_port()}"
    store = RunStore.open("s3://bucket/run-1", settings(endpoint_url=endpoint))
    started = time.perf_counter()
    with pytest.raises(StorageError) as err:
        store.publish(write_run(tmp_path / "scratch"))
    assert time.perf_counter() - started < 5
    assert str(err.value) == (f"s3://bucket/run-1/manifest.json: cannot reach the S3 endpoint {endpoint} (2 attempts); "
                              "check storage.endpoint_url and that the server is up")


def test_an_endpoint_that_never_answers_times_out_in_one_line(s3_server, tmp_path):
    with socket.socket() as silent:  # accepts connections (the kernel does) and never replies
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        store = RunStore.open("s3://bucket/run-1", settings(endpoint_url=endpoint, read_timeout_s=0.5))
        started = time.perf_counter()
        with pytest.raises(StorageError) as err:
            store.read_manifest()
        elapsed = time.perf_counter() - started
    assert 0.9 < elapsed < 5  # two attempts of 0.5 s
    assert str(err.value) == (f"s3://bucket/run-1/manifest.json: the S3 endpoint {endpoint} did not answer within "
                              "storage.read_timeout_s=0.5 (2 attempts); check that it is an S3 server")


def test_credentials_never_appear_in_anything_written(s3_server, s3_bucket, tmp_path, monkeypatch):
    key_id, secret = "AKIACANARY0123456789", "canary/Secret+Key0123456789abcdefghijkl"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    store = RunStore.open(f"s3://{s3_bucket}/run-1", settings(s3_server))
    scratch = write_run(tmp_path / "scratch")
    store.sync(scratch, ["metrics.jsonl"])
    store.publish(scratch, extra={"status": "trained"})
    store.fetch(tmp_path / "reader")
    client = s3_server.client()
    written = [path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()]
    for item in client.list_objects_v2(Bucket=s3_bucket)["Contents"]:
        obj = client.get_object(Bucket=s3_bucket, Key=item["Key"])
        written += [obj["Body"].read(), repr(obj["Metadata"]).encode()]
    assert len(written) > 2 * len(RUN_FILES)
    assert not [blob for blob in written if key_id.encode() in blob or secret.encode() in blob]


def test_uri_helpers_and_unsupported_schemes():
    assert is_remote("s3://b/p") and not is_remote("runs/x") and not is_remote("file:///tmp/x")
    assert join_uri("s3://b/p/", "r1", "runs/b32") == "s3://b/p/r1/runs/b32" and join_uri("runs", "r1") == "runs/r1"
    assert split_s3("s3://b/some/prefix/") == ("b", "some/prefix") and split_s3("s3://b") == ("b", "")
    with pytest.raises(ConfigError, match="^output_dir: gs:// is not supported; use a local path or s3://bucket/prefix$"):
        RunStore.open("gs://b/r1")
    with pytest.raises(ConfigError, match=r"^output_dir: 's3:///r1' names no bucket; use s3://bucket/prefix$"):
        RunStore.open("s3:///r1")
    with pytest.raises(ValueError):
        RunStore.open("runs/r1").put_bytes("../escape", b"")


def test_storage_settings_compose_and_validate():
    cfg = compose_config(["output_dir=s3://b/p", "storage.endpoint_url=http://127.0.0.1:9000",
                          "storage.multipart_threshold_mb=8"])
    assert cfg["storage"] == {"endpoint_url": "http://127.0.0.1:9000", "region": None, "multipart_threshold_mb": 8,
                              "max_attempts": 5, "connect_timeout_s": 10.0, "read_timeout_s": 60.0}
    assert parse_config(cfg).storage == StorageConfig(endpoint_url="http://127.0.0.1:9000", multipart_threshold_mb=8)
    # where a run is stored is not what it computes
    assert config_hash(config(storage={"endpoint_url": "http://x:1"})) == config_hash(config())


@pytest.mark.parametrize("override, message", [
    ("storage.multipart_threshold_mb=4",
     "storage.multipart_threshold_mb: must be >= 5 (S3's smallest part is 5 MiB); got 4"),
    ("storage.endpoint_url=127.0.0.1:9000", "storage.endpoint_url: must start with http:// or https:// (or be null "
                                            "for AWS); got '127.0.0.1:9000'"),
    ("storage.max_attempts=0", "storage.max_attempts: must be >= 1; got 0"),
    ("storage.read_timeout_s=0", "storage.read_timeout_s: must be > 0; got 0.0"),
    ("storage.endpont_url=http://x", "storage.endpont_url: unknown key (did you mean 'endpoint_url'?)"),
])
def test_bad_storage_settings_fail_in_one_line_naming_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        compose_config([override])
    assert str(err.value) == message
