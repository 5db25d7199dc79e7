"""Runs that are cluster-ready (issue 10), through kfp's local runner and a real moto_server
(conftest.py): every durable file goes to <output_dir>/<run_id>/ in the bucket and is read back
through the run's manifest; no step writes anywhere but its scratch directory, its artifacts and
the bucket; a killed training resumes from its synced checkpoint; the run id is decided at run
time; bad storage input is one line before any work."""

import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from components import storage
from components.config import StorageConfig
from components.registry import Registry
from components.run_store import MANIFEST, RunStore
from conftest import free_port
from pipelines import outputs, submit
from pipelines import report as report_cli

REPO = Path(__file__).resolve().parent.parent
CHEAP_PROBE = ["probe.warmup_steps=0", "probe.throughput_time_s=0.005", "probe.noise_batches=4"]
FIXED_BATCH = ["probe.enabled=false", "train.batch_size=32", "train.micro_batch_size=32"]


def in_bucket(server, bucket, prefix="runs") -> list:
    return ["output_dir=s3://" + f"{bucket}/{prefix}", f"storage.endpoint_url={server.endpoint_url}",
            "storage.region=us-east-1", "data=digits"]


def bucket_store(server, uri) -> RunStore:
    return RunStore.open(uri, StorageConfig(endpoint_url=server.endpoint_url, region="us-east-1"))


def published_json(store, key):
    return json.loads(store.read_published(key))


def test_a_run_in_s3_is_read_back_through_its_manifest_and_no_step_writes_elsewhere(s3_server, s3_bucket, tmp_path,
                                                                                   monkeypatch, capsys):
    monkeypatch.delenv("WANDB_MODE")  # W&B offline, the default: its runs go to the bucket too
    args = [*in_bucket(s3_server, s3_bucket), "run_id=r1", "train.max_steps=40", *CHEAP_PROBE, "--no-progress"]
    assert submit.main(args) == 0
    uri = f"s3://{s3_bucket}/runs/r1"
    store = bucket_store(s3_server, uri)
    manifest = store.read_manifest()
    assert (manifest["kind"], manifest["run_id"], manifest["status"]) == ("run", "r1", "completed")
    assert set(store.list()) == set(manifest["files"]) | {MANIFEST}  # everything stored is published
    assert {"config.yaml", "pipeline.yaml", "pipeline.log", "probe.json", "metrics.jsonl", "model.pt", "summary.json",
            "checkpoints/last.pt"} <= set(manifest["files"])
    wandb_runs = {k.split("/")[1].rsplit("-r1-", 1)[1] for k in manifest["files"] if k.startswith("wandb/offline-run-")}
    assert wandb_runs == {"probe", "train", "evaluate", "promote"}
    assert all(k.startswith("wandb/offline-run-") for k in manifest["files"] if k.startswith("wandb/"))

    # what the user reads: all of it from the bucket, each file verified against the manifest
    summary, probe = published_json(store, "summary.json"), published_json(store, "probe.json")
    assert (summary["status"], summary["run_id"], summary["optimizer_steps"]) == ("completed", "r1", 40)
    assert summary["effective_batch_size"] == probe["recommendation"]["effective_batch_size"]
    assert summary["wandb_dir"].startswith(f"{uri}/wandb/offline-run-") and summary["wandb_dir"].endswith("-r1-train")
    rows = storage.parse_jsonl(store.read_published("metrics.jsonl"))
    assert sum("train/loss" in r for r in rows) == 40 and max(r["step"] for r in rows) == 40
    model = torch.load(io.BytesIO(store.read_published("model.pt")), weights_only=False)
    assert model["lineage"] == summary["lineage"] == manifest["lineage"]
    assert "run_id: null" not in store.read_published("config.yaml").decode()
    out = capsys.readouterr().out
    assert "run r1" in out and f"run directory: {uri}\n" in out and "download s3://" in out

    # on this machine: submit's own copies, and in .kfp/ kfp's task artifacts (the steps' typed outputs)
    # and temp files; the steps' scratch directories are gone, and no run file is anywhere but the bucket
    local = outputs.local_dir(f"s3://{s3_bucket}/runs", "r1")
    files = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    listing = "\n".join(map(str, files))
    kfp = (local / outputs.KFP_DIR).relative_to(tmp_path)
    assert [p for p in files if not p.is_relative_to(kfp)] == \
        [(local / name).relative_to(tmp_path) for name in ("config.yaml", "pipeline.log", "pipeline.yaml")], listing
    artifacts = {("resolve-data", "executor_output.json"), ("data-prep", "executor_output.json"),
                 ("data-prep", "dataset", "manifest.json"), ("data-prep", "dataset", "arrays.npz"),
                 ("probe", "executor_output.json"), ("probe", "report"), ("train", "executor_output.json"),
                 ("train", "model"), ("evaluate", "executor_output.json"), ("promote", "executor_output.json"),
                 ("finalize", "executor_output.json")}
    kept = [p.relative_to(kfp).parts for p in files if p.is_relative_to(kfp)]
    task_temp = [parts for parts in kept if parts[0] == "tmp"]
    assert all(len(parts) == 3 and parts[2] == "ephemeral_component.py" for parts in task_temp), listing
    assert {parts[1:] for parts in kept if parts[0] != "tmp"} == artifacts, listing


def test_a_study_in_s3_and_its_report_rebuilt_from_the_bucket(s3_server, s3_bucket, tmp_path, capsys):
    args = [*in_bucket(s3_server, s3_bucket), "pipeline=study", "run_id=st", "probe.enabled=false",
            "train.batch_size=32", "train.micro_batch_size=16", "study.batch_sizes=[16,32]", "study.max_steps=12",
            "tracking.mode=disabled", "--no-progress"]
    assert submit.main(args) == 0
    uri = f"s3://{s3_bucket}/runs/st"
    assert f"report: {uri}/report.html" in capsys.readouterr().out
    store = bucket_store(s3_server, uri)
    manifest = store.read_manifest()
    assert (manifest["kind"], manifest["run_id"]) == ("study", "st")
    study = published_json(store, "study.json")
    names = [r["name"] for r in study["runs"]]
    assert names and {r["batch_size"] for r in study["runs"]} == {16, 32}
    for name in names:  # each run sealed on its own; the study's manifest lists its files too
        run = store.child(f"runs/{name}")
        run_manifest = run.read_manifest()
        assert run_manifest["kind"] == "run" and run_manifest["run_id"] == f"st-{name}"
        assert {f"runs/{name}/{key}" for key in run_manifest["files"]} <= set(manifest["files"])
        assert published_json(run, "summary.json")["effective_batch_size"] == int(name[1:].split("-")[0])
    page = store.read_published("report.html").decode()
    assert page.count("data:image/png;base64,") >= 5

    # pipelines.report: from the bucket through the manifest, back into the bucket, sealed again
    endpoint = ["--endpoint-url", s3_server.endpoint_url, "--region", "us-east-1"]
    assert report_cli.main([uri, *endpoint]) == 0
    assert capsys.readouterr().out.strip() == f"{uri}/report.html"
    again = store.read_manifest()
    assert again["published_at"] > manifest["published_at"] and again["kind"] == "study"
    assert "<h1>Convergence study st</h1>" in store.read_published("report.html").decode()
    # or into a local directory
    assert report_cli.main([uri, *endpoint, "--out", str(tmp_path / "rebuilt")]) == 0
    assert (tmp_path / "rebuilt" / "report.html").read_text().count("data:image/png;base64,") >= 5
    assert report_cli.main([f"s3://{s3_bucket}/runs/nothing", *endpoint]) == 2
    assert capsys.readouterr().err.strip() == (f"error: report: s3://{s3_bucket}/runs/nothing is not a published "
                                               "study (no manifest.json: it is still running, failed, or is not a "
                                               "study's directory)")


def test_a_killed_training_resumes_from_its_synced_checkpoint_with_the_same_weights(s3_server, s3_bucket, tmp_path):
    args = [*in_bucket(s3_server, s3_bucket), "probe.enabled=false", "train.batch_size=16", "train.micro_batch_size=16",
            "train.max_steps=2000", "eval.patience=1000", "train.checkpoint_every_steps=100",
            "train.checkpoint_every_s=null", "tracking.mode=disabled", "--no-progress"]
    assert submit.main([*args, "run_id=whole"]) == 0

    process = subprocess.Popen([sys.executable, "-m", "pipelines.submit", *args, "run_id=cut"], cwd=tmp_path,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
                               env={**os.environ, "PYTHONPATH": str(REPO)})
    client = s3_server.client()
    try:
        deadline = time.monotonic() + 120
        while not client.list_objects_v2(Bucket=s3_bucket, Prefix="runs/cut/checkpoints/last.pt").get("KeyCount"):
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.02)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the pod is gone: no Ctrl-C checkpoint, no note
        process.wait()
    cut = bucket_store(s3_server, f"s3://{s3_bucket}/runs/cut")
    assert not cut.is_published() and cut.get_json("summary.json")["status"] == "running"

    # a new run from the killed one's checkpoint (resume_from), then the killed one itself (its run id)
    assert submit.main([*args, "run_id=cont", f"resume_from={cut.uri}"]) == 0
    assert submit.main([*args, "run_id=cut"]) == 0
    whole = bucket_store(s3_server, f"s3://{s3_bucket}/runs/whole")
    expected = torch.load(io.BytesIO(whole.read_published("model.pt")), weights_only=False)["state_dict"]
    losses = [r["train/loss"] for r in storage.parse_jsonl(whole.read_published("metrics.jsonl")) if "train/loss" in r]
    for name in ("cont", "cut"):
        run = bucket_store(s3_server, f"s3://{s3_bucket}/runs/{name}")
        summary = published_json(run, "summary.json")
        assert 0 < summary["resumed_from_step"] < 2000 and summary["resumed_from_step"] % 100 == 0
        assert summary["optimizer_steps"] == 2000
        state = torch.load(io.BytesIO(run.read_published("model.pt")), weights_only=False)["state_dict"]
        assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in expected)
        rows = storage.parse_jsonl(run.read_published("metrics.jsonl"))  # no row twice, none lost
        assert [r["train/loss"] for r in rows if "train/loss" in r] == losses


def test_two_runs_of_one_compiled_pipeline_get_their_own_run_ids(s3_server, s3_bucket, tmp_path, monkeypatch, capsys):
    """What a schedule does: the same compiled pipeline, run twice, with no arguments."""
    from kfp import components, local

    monkeypatch.delenv("WANDB_MODE")  # W&B offline: each run's own W&B runs
    assert submit.main([*in_bucket(s3_server, s3_bucket, "sched"), *FIXED_BATCH, "train.max_steps=8",
                        "--compile-only"]) == 0
    compiled = re.search(r"compiled the train pipeline to (\S+)", capsys.readouterr().out).group(1)
    pipeline = components.load_component_from_file(compiled)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "kfp"), raise_on_error=True)
    root = logging.getLogger()
    handlers = root.handlers[:]
    try:
        pipeline()
        pipeline()
    finally:
        root.handlers[:] = handlers  # kfp's last log line installs a handler on this test's stderr

    sched = bucket_store(s3_server, f"s3://{s3_bucket}/sched")
    run_ids = sorted(key.split("/")[0] for key in sched.list() if key.endswith("/" + MANIFEST))
    assert len(run_ids) == 2 and run_ids[0] != run_ids[1]
    for run_id in run_ids:
        run = sched.child(run_id)
        manifest = run.read_manifest()
        summary = published_json(run, "summary.json")
        assert manifest["run_id"] == summary["run_id"] == run_id and "checkpoints/last.pt" in manifest["files"]
        assert summary["resumed_from_step"] is None and summary["optimizer_steps"] == 8  # neither resumed the other
        # W&B run ids are <run id>-<step>: offline-run-<time>-<W&B id>
        wandb = {key.split("/")[1].split(f"-{run_id}-")[1] for key in manifest["files"]
                 if key.startswith("wandb/offline-run-")}
        assert wandb == {"train", "evaluate", "promote"}
    # both were judged against one registry, the schedule's: <output_dir>/registry
    history = Registry(bucket_store(s3_server, f"s3://{s3_bucket}/sched/registry")).history()
    assert {e["decision"]["run_id"] for e in history} == set(run_ids) and len(history) == 2
    assert history[0]["decision"]["promoted"] and history[1]["champion"]["run_id"] == history[0]["decision"]["run_id"]


def test_bad_storage_input_fails_at_submit_in_one_line_before_any_work(s3_server, s3_bucket, capsys):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    cases = [
        (["output_dir=s3://no-such-bucket/runs", f"storage.endpoint_url={s3_server.endpoint_url}"],
         f"error: s3://no-such-bucket/runs/r: bucket 'no-such-bucket' does not exist at {s3_server.endpoint_url}; "
         "create it or fix output_dir"),
        ([f"output_dir=s3://{s3_bucket}/runs", f"storage.endpoint_url={dead}", "storage.max_attempts=1"],
         f"error: s3://{s3_bucket}/runs/r: cannot reach the S3 endpoint {dead} (1 attempt); check storage.endpoint_url "
         "and that the server is up"),
        ([f"output_dir=s3://{s3_bucket}/runs", f"storage.endpoint_url={s3_server.endpoint_url}",
          f"resume_from=s3://{s3_bucket}/runs/never"],
         f"error: resume_from: s3://{s3_bucket}/runs/never holds no checkpoints/last.pt; name a run's location, "
         "<output_dir>/<run_id>, that has checkpointed"),
    ]
    for overrides, line in cases:
        started = time.perf_counter()
        assert submit.main([*overrides, "data=digits", *FIXED_BATCH, "run_id=r", "--no-progress"]) == 2
        assert capsys.readouterr().err.strip().splitlines() == [line]
        assert time.perf_counter() - started < 15
        local = outputs.local_dir(overrides[0].split("=", 1)[1], "r")
        assert not (local / "pipeline.log").exists() and not (local / outputs.KFP_DIR).exists()  # no step ran
    assert not s3_server.client().list_objects_v2(Bucket=s3_bucket).get("KeyCount")  # nothing half-published
