"""Divergence is a status, never a result: a run whose loss goes non-finite, or whose metric
collapses after improving, ends `diverged`; NaN weights are never the saved best model; every
file such a run writes is strict JSON."""

import json
import math
from pathlib import Path

import torch

from components import early_stopping, evaluate, models, storage, train, training
from conftest import config


def strict_load(text: str):
    """json.loads that refuses NaN/Infinity, as any non-Python parser does."""
    def refuse(token):
        raise ValueError(f"non-strict JSON token {token}")
    return json.loads(text, parse_constant=refuse)


def every_json_file_is_strict(run_dir: Path) -> int:
    n = 0
    for path in run_dir.rglob("*.json"):
        strict_load(path.read_text())
        n += 1
    for path in run_dir.rglob("*.jsonl"):
        for line in path.read_text().splitlines():
            strict_load(line)
        n += 1
    return n


def run_steps(cfg, digits, tmp_path):
    """train.run then evaluate.run, as the pipeline calls them, on the digits dataset artifact."""
    from components import datasets

    dataset_dir = tmp_path / "dataset"
    datasets.save(digits, dataset_dir)
    run_dir = tmp_path / "run"
    raw = cfg.to_dict()
    outcome = train.run(raw, str(dataset_dir), str(tmp_path / "model.pt"), str(run_dir), progress=False)
    storage.write_json(run_dir / "train_result.json", outcome)
    summary = evaluate.run(raw, str(dataset_dir), str(tmp_path / "model.pt"), outcome, str(run_dir))
    return outcome, summary, run_dir


def test_a_non_finite_loss_before_the_first_evaluation_leaves_no_model(digits, tmp_path):
    cfg = config(train={"lr": 1e6, "max_epochs": 3})  # one evaluation per epoch: NaN long before it
    outcome, summary, run_dir = run_steps(cfg, digits, tmp_path)
    assert (summary["status"], summary["stop_reason"]) == ("diverged", early_stopping.NON_FINITE)
    d = summary["divergence"]
    assert d["rule"] == early_stopping.RULE_NON_FINITE and d["step"] < 39 and d["lr"] == 1e6
    assert "train.lr" in d["advice"] and "train.warmup_steps" in d["advice"]
    assert summary["best_metric"]["value"] is None and summary["test"] == {}
    assert outcome["model_file"] is None
    assert not (run_dir / train.MODEL_FILE).exists() and not (tmp_path / "model.pt").exists()
    assert every_json_file_is_strict(run_dir) >= 3  # summary, train_result, metrics.jsonl
    last = storage.read_jsonl(run_dir / training.METRICS)[-1]
    assert last["train/loss"] is None and last["train/loss_note"].startswith("non-finite")


def test_the_evaluate_command_exits_non_zero_on_a_diverged_run(digits, tmp_path):
    import pytest

    cfg = config(train={"lr": 1e6, "max_epochs": 1})
    outcome, _, run_dir = run_steps(cfg, digits, tmp_path)
    storage.write_json(tmp_path / "config.json", cfg.to_dict())
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--config", str(tmp_path / "config.json"), "--dataset", str(tmp_path / "dataset"),
                       "--model", str(tmp_path / "model.pt"), "--train-result", str(run_dir / "train_result.json"),
                       "--run-dir", str(run_dir)])
    assert exit_info.value.code == 3


def test_a_collapse_after_improving_is_diverged_and_the_best_weights_are_from_before_it(digits, tmp_path):
    """At step 60 the weights are wiped (what a too-high LR does to a run that was learning): the
    metric falls back to chance at the next two evaluations, and the run ends diverged, and the model saved is
    the best one from before the collapse, with a finite test score."""
    cfg = config(train={"max_steps": 400, "lr": 0.05}, eval={"every_steps": 10, "patience": 100})
    torch.manual_seed(cfg.train.seed)
    model = models.build_model(cfg.model, digits.input_shape, 10)

    def wipe(step):
        if step == 60:
            with torch.no_grad():
                for p in model.parameters():
                    p.zero_()

    result = training.fit(model, digits, cfg, tmp_path, progress=False, on_step=wipe)
    assert result.status == "diverged" and result.stop_reason == early_stopping.DIVERGED
    # the weights are wiped after step 60: evaluations at 60 and 70 are back at the start
    assert result.divergence["rule"] == early_stopping.RULE_COLLAPSE and result.optimizer_steps == 70
    assert result.best_metric["step"] <= 50 and result.best_metric["value"] > 0.8
    x, y = (torch.as_tensor(a) for a in digits.split("val"))
    from components import metrics

    assert metrics.evaluate(model, x, y, "classification", 10)["val/accuracy"] == result.best_metric["value"]


def test_adamw_at_a_huge_lr_is_not_an_ordinary_early_stop(digits, tmp_path):
    cfg = config(train={"optimizer": "adamw", "lr": 1e6, "max_epochs": 30}, eval={"patience": 5})
    _, summary, run_dir = run_steps(cfg, digits, tmp_path)
    assert summary["status"] == "diverged", summary["stop_reason"]
    assert summary["stop_reason"] != early_stopping.PATIENCE
    assert every_json_file_is_strict(run_dir) >= 3
    if summary["best_metric"]["value"] is not None:  # a finite best was saved: its score is finite too
        assert all(math.isfinite(v) for v in summary["test"].values() if isinstance(v, float))


def test_a_healthy_run_is_completed(digits, tmp_path):
    _, summary, run_dir = run_steps(config(train={"max_epochs": 3}), digits, tmp_path)
    assert (summary["status"], summary["divergence"]) == ("completed", None)
    assert summary["test"]["accuracy"] > 0.8 and (run_dir / train.MODEL_FILE).exists()


def test_a_diverged_pipeline_run_exits_3_and_every_file_it_wrote_is_strict_json(tmp_path):
    """Through submit and kfp's local runner: the task artifacts' metadata (protobuf JSON, which
    refused NaN with a 75-line traceback) included."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-m", "pipelines.submit", f"output_dir={tmp_path}", "run_id=nan",
                           "probe.enabled=false", "train.batch_size=32", "train.micro_batch_size=32",
                           "train.lr=1e6", "train.max_epochs=2", "tracking.mode=disabled"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "PYTHONPATH": str(repo)})
    assert done.returncode == 3, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("diverged: non_finite at step ")
    assert "Traceback" not in done.stdout + done.stderr
    run_dir = tmp_path / "nan"
    summary = storage.read_json(run_dir / "summary.json")
    assert summary["status"] == "diverged"
    assert summary["promotion"]["promoted"] is False  # promote ran, and refused it: never a champion
    assert "promotion: kept: run nan not promoted: status diverged" in done.stdout
    assert not (run_dir / train.MODEL_FILE).exists()
    assert every_json_file_is_strict(run_dir) >= 5  # summary, metrics, the kfp tasks' outputs
