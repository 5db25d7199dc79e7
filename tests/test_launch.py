"""train.nproc: the train step runs its training under the real torchrun (components/launch.py), and
the pipeline sees what one process gives: the same weights, outcome, metrics, progress note, and
Ctrl-C / SIGTERM / bad-input behaviour."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from components import data_prep, launch, storage, train, training
from components.config import Config, parse_config
from components.errors import ConfigError
from conftest import config
from pipelines import submit

ROOT = Path(__file__).resolve().parent.parent
CHEAP = ["data=digits", "probe.enabled=false", "registry.enabled=false", "tracking.mode=disabled",
         "train.batch_size=64", "train.micro_batch_size=16", "train.max_steps=30", "eval.every_steps=10"]
LONG = {"max_steps": 100_000, "max_epochs": 10_000}  # stopped by a signal long before the end


def losses(run_dir):
    return [r["train/loss"] for r in storage.read_jsonl(run_dir / training.METRICS) if "train/loss" in r]


def test_submit_with_two_processes_trains_the_same_weights_as_one(tmp_path, capsys):
    assert submit.main([*CHEAP, "train.nproc=2", f"output_dir={tmp_path}", "run_id=two", "--no-progress"]) == 0
    two = storage.read_json(tmp_path / "two" / "summary.json")
    assert (two["world_size"], two["micro_batch_size"], two["accumulation_steps"]) == (2, 16, 2)
    assert two["status"] == "completed" and two["optimizer_steps"] == 30 and two["samples_seen"] == 30 * 64
    assert "64 = 16 micro x 2 accumulation x 2 processes" in capsys.readouterr().out
    # the reference: the same resolved config in one process (16 x 4), on the same data, here
    raw = yaml.safe_load((tmp_path / "two" / "config.yaml").read_text())
    raw.update(run_id="one", train={**raw["train"], "nproc": 1})
    data_prep.run(raw, str(tmp_path / "dataset"))
    one = train.run(raw, str(tmp_path / "dataset"), str(tmp_path / "one.pt"))
    assert (one["world_size"], one["accumulation_steps"]) == (1, 4) and one["config_hash"] == two["config_hash"]
    weights = [storage.load_torch(path)["state_dict"] for path in (tmp_path / "one.pt", tmp_path / "two" / "model.pt")]
    for key in weights[0]:
        torch.testing.assert_close(weights[1][key], weights[0][key], rtol=1e-5, atol=1e-6)
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)
    assert two["best_metric"] == {**one["best_metric"], "value": pytest.approx(one["best_metric"]["value"])}


def test_ctrl_c_stops_both_ranks_with_a_checkpoint_and_says_how_to_resume(tmp_path):
    # the rows reach the run's directory with each checkpoint
    args = [*CHEAP[:-2], "train.max_steps=100000", "train.max_epochs=10000", "eval.every_steps=1000",
            "train.checkpoint_every_steps=20", "train.nproc=2", f"output_dir={tmp_path}", "run_id=stop"]
    # its own process group, as a terminal's foreground job: Ctrl-C reaches submit and its step's process
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.submit", *args, "--no-progress"], cwd=tmp_path,
                            start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_steps(tmp_path / "stop", proc)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == submit.EXIT_INTERRUPTED, err[-2000:]
    resume = submit.resume_command("stop", args)
    assert err.strip().splitlines()[-1] == f"interrupted during train; resume with: {resume}"
    run_dir = tmp_path / "stop"
    assert storage.read_json(run_dir / "summary.json")["status"] == "interrupted"
    checkpoint = storage.load_torch(run_dir / training.CHECKPOINT)
    assert len(checkpoint["rng"]) == 2 and checkpoint["step"] > 0 and not checkpoint["finished"]
    assert max(r["step"] for r in storage.read_jsonl(run_dir / training.METRICS)) == checkpoint["step"]
    assert "ChildFailedError" not in err and "SignalException" not in err  # torchrun was not signalled


def wait_for_steps(run_dir, proc, at_least=50, timeout=90):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        try:
            if sum(1 for _ in open(run_dir / training.METRICS)) >= at_least:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"no training rows in {run_dir} after {timeout} s")


@pytest.fixture
def job(tmp_path):
    """The train step's inputs, as `python -m components.train` gets them."""
    raw = config(train={"batch_size": 64, "micro_batch_size": 16, "nproc": 2, "checkpoint_every_steps": 20, **LONG},
                 eval={"every_steps": 1000}).to_dict()
    raw.update(output_dir=str(tmp_path / "runs"), run_id="r")
    data_prep.run(raw, str(tmp_path / "dataset"))
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(raw))
    return raw, tmp_path


def test_sigterm_stops_the_ranks_after_a_step_with_a_checkpoint_and_a_bad_resume_is_one_line(job):
    raw, tmp_path = job
    run_dir = tmp_path / "runs" / "r"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "components.train", "--config", str(tmp_path / "config.yaml"),
                             "--dataset", str(tmp_path / "dataset"), "--model-out", str(tmp_path / "model.pt"),
                             "--run-dir", str(run_dir)], env=env, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_steps(run_dir, proc)
        proc.send_signal(signal.SIGTERM)  # a pod evicted: the step's process, not its ranks
        _, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    checkpoint = storage.load_torch(run_dir / training.CHECKPOINT)
    assert proc.returncode == 1, err[-3000:]
    assert err.strip().splitlines()[-1] == (f"components.training.Terminated: SIGTERM: stopped after step "
                                            f"{checkpoint['step']} with a checkpoint; the run resumes from it")
    assert len(checkpoint["rng"]) == 2 and checkpoint["step"] > 0
    assert not (tmp_path / "model.pt").exists()

    # the same run with another config: the ranks refuse it, and the step says so in one line
    other = {**raw, "train": {**raw["train"], "lr": 0.01}}
    with pytest.raises(ConfigError, match=rf"^run_id: {re.escape(str(run_dir))} holds a run with a different "
                                          rf"config_hash \({checkpoint['config_hash']} != "):
        train.run(other, str(tmp_path / "dataset"), str(tmp_path / "model.pt"))


def test_each_rank_gets_its_share_of_the_cpus_and_runs_under_torchrun_standalone(monkeypatch, tmp_path):
    cfg = config(train={"nproc": 2, "batch_size": 64})
    monkeypatch.setattr(launch, "usable_cpus", lambda: 5)
    assert launch.threads_per_rank(cfg, environ={}) == 2
    assert launch.threads_per_rank(cfg, environ={"OMP_NUM_THREADS": "1"}) == 1
    monkeypatch.setattr(launch, "usable_cpus", lambda: 1)
    assert launch.threads_per_rank(cfg, environ={}) == 1  # never none
    env = launch.environment(cfg, environ={"PYTHONPATH": "/user/pkg"})
    assert env["OMP_NUM_THREADS"] == "1" and env["PYTHONPATH"] == f"{ROOT}{os.pathsep}/user/pkg"
    assert launch.command(cfg, tmp_path)[1:] == ["-m", "torch.distributed.run", "--standalone",
                                                 "--nproc-per-node=2", "-m", "components.launch", str(tmp_path)]


def test_world_size_is_nproc_here_and_gpus_per_pod_on_a_cluster():
    raw = Config().to_dict()
    raw["train"].update(batch_size=64, micro_batch_size=8, nproc=2)
    assert parse_config(raw).world_size == 2 and parse_config(raw).accumulation_steps == 4
    raw["platform"].update(name="kubeflow", host="https://kfp.example.com")
    assert parse_config(raw).world_size == 2  # CPU pods: train.nproc each
    raw["platform"]["gpu"]["count"] = 4
    cfg = parse_config({**raw, "train": {**raw["train"], "nproc": 1}})
    assert (cfg.world_size, cfg.nproc_per_node, cfg.accumulation_steps) == (4, 4, 2)
    with pytest.raises(ConfigError, match=r"^train.nproc: must be an integer >= 1; got 0$"):
        config(train={"nproc": 0})
    with pytest.raises(ConfigError, match=r"^train.nproc: the study trains each of its runs in one process"):
        parse_config({**Config().to_dict(), "pipeline": "study", "eval": {"target": 0.9},
                      "train": {**Config().to_dict()["train"], "nproc": 2}})


def test_on_step_and_a_missing_gpu_are_refused_before_any_process_starts(job, monkeypatch):
    raw, tmp_path = job
    with pytest.raises(ValueError, match="^on_step: the ranks run in other processes"):
        train.run(raw, str(tmp_path / "dataset"), str(tmp_path / "model.pt"), on_step=print)
    monkeypatch.setattr(launch, "_cuda_count", lambda: 1)
    with pytest.raises(ConfigError, match=r"^train.nproc: 2 processes need one GPU each; 1 visible here$"):
        launch.check_launchable(parse_config({**raw, "train": {**raw["train"], "device": "auto"}}))
