"""Lineage (components/lineage.py): real values from git, the environment and the installed
packages; a config hash free of paths; and the record in summary.json, model.pt and the W&B run."""

import glob
import hashlib
import importlib.metadata
import json
import subprocess

import numpy as np
import pandas as pd
import pytest

from components import data_prep, evaluate, lineage, storage, train
from components.config import PlatformConfig, config_hash, parse_config
from conftest import config

GIT = ("git", "-c", "user.name=t", "-c", "user.email=t@t")


def git(repo, *args) -> str:
    return subprocess.run([*GIT, *args], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


def test_code_version_is_the_checkouts_commit_and_follows_a_modified_tracked_file(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "tracked.py").write_text("x = 1\n")
    git(repo, "add", "tracked.py")
    git(repo, "commit", "-qm", "one")
    clean = {"commit": git(repo, "rev-parse", "HEAD"), "dirty": False, "from": "git"}
    assert lineage.code_version(repo) == clean
    (repo / "untracked.txt").write_text("not part of the code\n")
    assert lineage.code_version(repo) == clean
    (repo / "tracked.py").write_text("x = 2\n")
    assert lineage.code_version(repo) == {**clean, "dirty": True}
    # this project: its own checkout's HEAD
    root = lineage.PROJECT_ROOT
    assert lineage.code_version()["commit"] == git(root, "rev-parse", "HEAD")


def test_inside_the_image_the_commit_and_digest_come_from_the_environment(tmp_path, monkeypatch):
    platform = PlatformConfig(image="registry.example/convergence:1")
    assert lineage.code_version(tmp_path) == {"commit": None, "dirty": None, "from": None}  # no git, no image
    assert lineage.image(platform) is None  # locally the steps run in this environment, not an image
    monkeypatch.setenv(lineage.COMMIT_ENV, "0123abc")
    monkeypatch.setenv(lineage.DIRTY_ENV, "false")
    monkeypatch.setenv(lineage.IMAGE_DIGEST_ENV, "sha256:" + "f" * 64)
    assert lineage.code_version(tmp_path) == {"commit": "0123abc", "dirty": False, "from": "CONVERGENCE_GIT_COMMIT"}
    assert lineage.image(platform) == {"name": "registry.example/convergence:1", "digest": "sha256:" + "f" * 64}


def test_library_versions_are_the_installed_ones():
    versions = lineage.library_versions()
    assert {k: versions[k] for k in ("torch", "kfp", "dvc")} == \
        {name: importlib.metadata.version(name) for name in ("torch", "kfp", "dvc")}
    assert versions["dvc"] == "3.67.1"


def dvc_run(repo, output_dir, run_id, version="b93a6678924a66956fec9a2c7666c9b1.dir", **train):
    return parse_config(config(data={"name": "dvc", "repo": repo, "path": "data/digits.csv", "version": version,
                                     "input_shape": [1, 8, 8]},
                               output_dir=output_dir, run_id=run_id, train=train).to_dict())


def test_config_hash_is_the_same_from_another_checkout_and_changes_with_data_or_hyperparameters():
    here = dvc_run("/home/a/convergence", "/home/a/convergence/runs", "20261201-a")
    there = dvc_run("/srv/ci/checkout", "s3://bucket/runs", "20261202-b")
    assert config_hash(here) == config_hash(there)
    assert config_hash(dvc_run("/srv/ci/checkout", "runs", "x", version="0" * 32 + ".dir")) != config_hash(here)
    assert config_hash(dvc_run("/home/a/convergence", "runs", "x", lr=0.1)) != config_hash(here)
    files = [parse_config(config(data={"name": "file", "path": p, "version": "ab" * 32}).to_dict())
             for p in ("/home/a/t.csv", "/srv/b/t.csv")]
    assert config_hash(files[0]) == config_hash(files[1])
    # before its version is known (at submit, comparing a run's saved config on this machine) the
    # data counts by where it comes from
    unversioned = [parse_config(config(data={"name": "file", "path": p}).to_dict()) for p in ("/a/t.csv", "/b/t.csv")]
    assert config_hash(unversioned[0]) != config_hash(unversioned[1])


def test_a_trained_run_records_its_lineage_in_summary_model_and_wandb(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE")  # offline W&B, the default
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.normal(size=(200, 4)), columns=list("abcd"))
    frame["label"] = (frame.a > 0).astype(int)
    frame.to_csv(tmp_path / "t.csv", index=False)
    raw = config(data={"name": "file", "path": str(tmp_path / "t.csv"), "target": "label"},
                 train={"max_steps": 5}, tracking={"mode": "offline"}, run_id="lin").to_dict()
    data_prep.run(raw, str(tmp_path / "dataset"))
    run_dir = tmp_path / "run"
    outcome = train.run(raw, str(tmp_path / "dataset"), str(tmp_path / "model.pt"), str(run_dir), progress=False)
    summary = evaluate.run(raw, str(tmp_path / "dataset"), str(tmp_path / "model.pt"), outcome, str(run_dir))

    recorded = storage.read_json(run_dir / "summary.json")["lineage"]
    sha256 = hashlib.sha256((tmp_path / "t.csv").read_bytes()).hexdigest()
    assert recorded["data"] == {"source": {"kind": "file", "path": str(tmp_path / "t.csv"), "version": sha256},
                                "version": sha256}
    assert summary["data_version"] == sha256
    code = recorded["code"]  # this checkout's commit (HEAD, or an ancestor if someone committed meanwhile)
    assert code["from"] == "git" and isinstance(code["dirty"], bool)
    git(lineage.PROJECT_ROOT, "merge-base", "--is-ancestor", code["commit"], "HEAD")
    assert recorded["config_hash"] == summary["config_hash"] and recorded["image"] is None
    assert recorded["versions"] == lineage.library_versions()
    assert storage.load_torch(run_dir / "model.pt")["lineage"] == recorded
    assert storage.load_torch(tmp_path / "model.pt")["lineage"] == recorded
    # the train step's W&B run config (the offline run file holds it as JSON)
    (wandb_file,) = glob.glob(str(run_dir / "wandb" / "offline-run-*-lin-train" / "run-*.wandb"))
    text = open(wandb_file, "rb").read().decode("utf-8", "replace")
    start = text.index("{", text.index("lineage"))
    assert json.JSONDecoder().raw_decode(text[start:])[0] == recorded


@pytest.mark.parametrize("name", ["digits", "synthetic"])
def test_generated_data_is_versioned_by_its_content(name, tmp_path):
    manifest = data_prep.run(config(data={"name": name}).to_dict(), str(tmp_path / "d"))
    assert manifest["source"] == {"kind": name, "version": None}
    assert len(manifest["data_version"]) == 16  # datasets.content_hash
