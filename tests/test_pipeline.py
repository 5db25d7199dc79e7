"""The real pipeline graph, compiled by kfp and run end to end by kfp's local runner."""

import json
import logging

import numpy as np
import pandas as pd
import pytest
import yaml

from components import storage
from components.example_data import PROJECT_ROOT
from components.registry import Registry
from components.run_store import RunStore
from pipelines import outputs, submit

SUMMARY_FIELDS = {
    "run_id", "status", "stop_reason", "effective_batch_size", "micro_batch_size", "accumulation_steps",
    "world_size", "lr", "optimizer", "optimizer_steps", "epochs", "samples_seen", "wall_time_s", "best_metric",
    "test", "steps_to_target", "samples_to_target", "time_to_target_s", "data_version", "config_hash",
}


def compiled(tmp_path, *overrides):
    assert submit.main(["--compile-only", f"output_dir={tmp_path}", "run_id=c", *overrides]) == 0
    return yaml.safe_load((tmp_path / "c" / "pipeline.yaml").read_text())


def graph_tasks(spec) -> dict:
    """The graph's tasks: inside the exit handler, whose finalize step runs after them (pipelines/graph.py)."""
    assert set(spec["root"]["dag"]["tasks"]) == {"exit-handler-1", "finalize"}
    return spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]


def test_compiled_pipeline_has_the_steps_in_order(tmp_path):
    spec = compiled(tmp_path, "platform.image=reg/img:1")
    tasks = graph_tasks(spec)
    assert set(tasks) == {"resolve-data", "data-prep", "probe", "train", "evaluate", "promote"}
    # the data version, resolved on every run, is an input of data_prep: part of its cache key
    assert tasks["data-prep"]["inputs"]["parameters"]["data_source"]["taskOutputParameter"] == \
        {"outputParameterKey": "data_source", "producerTask": "resolve-data"}
    assert not tasks["resolve-data"]["cachingOptions"].get("enableCache", False)
    # every step reads the run's config from resolve_data (the typed parameters merged in)
    assert sorted(tasks["probe"]["dependentTasks"]) == ["data-prep", "resolve-data"]
    assert sorted(tasks["train"]["dependentTasks"]) == ["data-prep", "probe", "resolve-data"]
    assert sorted(tasks["evaluate"]["dependentTasks"]) == ["data-prep", "probe", "resolve-data", "train"]
    # the probe's decision reaches train as typed integer parameters
    train_inputs = tasks["train"]["inputs"]["parameters"]
    assert train_inputs["batch_size"]["taskOutputParameter"] == {"outputParameterKey": "batch_size",
                                                                 "producerTask": "probe"}
    component = spec["components"]["comp-train"]["inputDefinitions"]["parameters"]
    assert component["batch_size"]["parameterType"] == "NUMBER_INTEGER"
    # the config compiled in without a run id (each run's id is KFP's job id, at run time), and the
    # typed parameters (tests/test_compiled_pipeline.py)
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert set(params) == {"config_json", "run_id", "data_path", "data_repo", "data_rev", "target", "batch_size",
                           "micro_batch_size"}
    assert json.loads(params["config_json"]["defaultValue"])["run_id"] is None and params["run_id"]["defaultValue"] == ""
    for step in ("probe", "train", "evaluate"):
        assert tasks[step]["inputs"]["parameters"]["job_id"]["runtimeValue"]["constant"] == "{{$.pipeline_job_uuid}}"
    assert "job_id" not in tasks["data-prep"]["inputs"]["parameters"]  # its cache key stays the data's and config's
    executors = spec["deploymentSpec"]["executors"]
    assert {e["container"]["image"] for e in executors.values()} == {"reg/img:1"}
    assert not any("pip install" in " ".join(e["container"]["command"]) for e in executors.values())
    assert not any("resources" in e["container"] for e in executors.values())  # no GPU asked by default
    assert not tasks["train"]["cachingOptions"].get("enableCache", False)
    # promote: after evaluate (its summary), on train's model and the dataset, never cached
    assert sorted(tasks["promote"]["dependentTasks"]) == ["data-prep", "evaluate", "resolve-data", "train"]
    assert tasks["promote"]["inputs"]["parameters"]["evaluation"]["taskOutputParameter"] == \
        {"outputParameterKey": "Output", "producerTask": "evaluate"}
    assert tasks["promote"]["inputs"]["artifacts"]["model"]["taskOutputArtifact"] == \
        {"outputArtifactKey": "model", "producerTask": "train"}
    assert not tasks["promote"]["cachingOptions"].get("enableCache", False)
    assert not any("env" in e["container"] for e in executors.values())  # no digest in a tag: none passed


def test_an_image_by_digest_reaches_every_task_as_convergence_image_digest(tmp_path):
    digest = "sha256:" + "ab" * 32
    for pipeline in ("train", "study"):
        spec = compiled(tmp_path / pipeline, f"pipeline={pipeline}", f"platform.image=reg/img@{digest}")
        executors = spec["deploymentSpec"]["executors"]
        assert len(executors) >= 6
        for executor in executors.values():
            assert executor["container"]["image"] == f"reg/img@{digest}"
            assert executor["container"]["env"] == [{"name": "CONVERGENCE_IMAGE_DIGEST", "value": digest}]


def test_registry_disabled_compiles_no_promote_step(tmp_path):
    tasks = graph_tasks(compiled(tmp_path, "registry.enabled=false"))
    assert "promote" not in tasks and "evaluate" in tasks


def test_gpu_steps_request_accelerators_from_config(tmp_path):
    spec = compiled(tmp_path, "platform.gpu.count=2", "platform.gpu.type=nvidia.com/gpu")
    executors = spec["deploymentSpec"]["executors"]
    for name in ("exec-probe", "exec-train"):
        accelerator = executors[name]["container"]["resources"]["accelerator"]
        assert (accelerator["resourceType"], accelerator["resourceCount"]) == ("nvidia.com/gpu", "2")
    assert "resources" not in executors["exec-data-prep"]["container"]
    assert "resources" not in executors["exec-evaluate"]["container"]


def test_without_the_probe_the_config_numbers_feed_train(tmp_path):
    spec = compiled(tmp_path, "probe.enabled=false", "train.batch_size=64", "train.micro_batch_size=16")
    tasks = graph_tasks(spec)
    assert set(tasks) == {"resolve-data", "data-prep", "train", "evaluate", "promote"}
    # the run's config's numbers, from resolve_data (typed parameters may change them at run time)
    params = tasks["train"]["inputs"]["parameters"]
    assert [params[k]["taskOutputParameter"] for k in ("batch_size", "micro_batch_size")] == [
        {"outputParameterKey": k, "producerTask": "resolve-data"} for k in ("batch_size", "micro_batch_size")]
    declared = spec["root"]["inputDefinitions"]["parameters"]
    assert (declared["batch_size"]["defaultValue"], declared["micro_batch_size"]["defaultValue"]) == ("64", "16")


def test_default_pipeline_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WANDB_MODE")  # the default: W&B offline
    assert submit.main([f"output_dir={tmp_path / 'runs'}", "run_id=default", "--no-progress"]) == 0
    run_dir = tmp_path / "runs" / "default"
    summary = storage.read_json(run_dir / "summary.json")
    assert SUMMARY_FIELDS <= set(summary)
    assert summary["status"] == "completed" and summary["run_id"] == "default"
    # the probe decided the batch sizes (train.batch_size=auto): summary, probe.json and the rule agree
    probe = storage.read_json(run_dir / "probe.json")
    chosen = probe["recommendation"]
    batch, micro, accumulation = (summary[k] for k in ("effective_batch_size", "micro_batch_size", "accumulation_steps"))
    assert (batch, micro, accumulation) == (chosen["effective_batch_size"], chosen["micro_batch_size"],
                                            chosen["accumulation_steps"])
    assert batch == micro * accumulation * summary["world_size"] and summary["world_size"] == 1
    assert micro <= probe["memory"]["micro_batch_size"]
    assert summary["lr"] == pytest.approx(0.05 * batch / 32) and summary["optimizer"] == "sgd"  # linear scaling
    reasons = probe["reasoning"]
    assert summary["probe"]["reasoning"] == reasons
    assert reasons[0].startswith("largest fitting micro-batch") and reasons[1].startswith("throughput flat above")
    assert reasons[-1].startswith(f"-> effective {batch} = ") and any(r.startswith("B_simple ~ ") for r in reasons)
    assert reasons[-2].startswith(f"the trainer's step at micro-batch {micro}: ")  # components/loop_pace.py
    # re-measured rungs and a close choice's settling add a line each, when the timings call for them
    assert any(r.startswith("settled micro-batch") for r in reasons) == bool(probe["throughput"]["settled"])
    assert probe["noise_scale"]["b_simple"] > 0 and probe["throughput"]["ladder"]
    assert summary["samples_seen"] == batch * summary["optimizer_steps"]
    assert summary["epochs"] == pytest.approx(summary["optimizer_steps"] / (1259 // batch))
    assert summary["stop_reason"] in ("early_stopping", "max_epochs")
    assert summary["best_metric"]["name"] == "val/accuracy" and summary["best_metric"]["value"] > 0.93
    assert summary["test"]["accuracy"] > 0.93 and len(summary["test"]["confusion_matrix"]) == 10
    assert summary["steps_to_target"] is None and summary["time_to_target_s"] is None  # no target by default

    rows = storage.read_jsonl(run_dir / "metrics.jsonl")
    assert max(r["step"] for r in rows) == summary["optimizer_steps"]
    assert sum("train/loss" in r for r in rows) == summary["optimizer_steps"]
    best = max((r for r in rows if "val/accuracy" in r), key=lambda r: (r["val/accuracy"], -r["step"]))
    assert best["step"] == summary["best_metric"]["step"]

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["run_id"] == "default" and config["data"]["name"] == "dvc"  # the example data through DVC
    assert summary["data_version"] == yaml.safe_load((PROJECT_ROOT / "data.dvc").read_text())["outs"][0]["md5"]
    assert "convergence-train" in (run_dir / "pipeline.yaml").read_text()
    model = storage.load_torch(run_dir / "model.pt")
    assert model["data_version"] == summary["data_version"] and model["config"]["run_id"] == "default"
    assert model["lineage"] == summary["lineage"] and summary["lineage"]["data"]["version"] == summary["data_version"]
    assert list((run_dir / outputs.KFP_DIR).rglob("manifest.json"))  # task artifacts: the local runner's, beside the run
    manifest = storage.read_json(run_dir / "manifest.json")  # written last, over every step's files
    assert (manifest["kind"], manifest["status"], manifest["lineage"]) == ("run", "completed", summary["lineage"])
    assert {"config.yaml", "pipeline.yaml", "pipeline.log", "probe.json", "metrics.jsonl", "model.pt", "summary.json",
            "checkpoints/last.pt"} <= set(manifest["files"])
    assert not any(key.startswith(".") for key in manifest["files"])  # not the lock, not kfp's artifacts
    offline = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    assert sorted(name.split("-default-")[1] for name in offline) == ["evaluate", "probe", "promote", "train"]
    assert list((run_dir / "wandb").glob("offline-run-*train/run-*.wandb"))

    out = capsys.readouterr().out
    assert f"{batch} = {micro} micro x {accumulation} accumulation x 1 process" in out
    assert f"run directory: {run_dir}" in out and "wandb sync" in out


@pytest.fixture
def user_project(tmp_path, monkeypatch):
    """A user's CSV and model package, importable by the pipeline's task processes."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 6))
    frame = pd.DataFrame(x, columns=[f"f{i}" for i in range(6)])
    frame["label"] = np.where(x[:, 0] + 0.5 * x[:, 1] > 0, "yes", "no")
    frame.to_csv(tmp_path / "mine.csv", index=False)
    pkg = tmp_path / "userpkg"
    pkg.mkdir()
    (pkg / "my_models.py").write_text(
        "import math, torch\n"
        "def build(input_shape, output_dim, width=8):\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(math.prod(input_shape), width),\n"
        "                               torch.nn.ReLU(), torch.nn.Linear(width, output_dim))\n")
    monkeypatch.setenv("PYTHONPATH", str(pkg))
    monkeypatch.syspath_prepend(str(pkg))
    return tmp_path


def test_user_csv_and_model_factory_end_to_end_then_resume(user_project, capsys):
    args = ["data=file", "data.path=mine.csv", "data.target=label", "model.factory=my_models:build",
            "+model.kwargs.width=12", "train.batch_size=64", "train.micro_batch_size=16", "train.optimizer=adamw",
            "train.lr=0.01", "eval.target=0.9", "output_dir=out", "run_id=mine", "--no-progress"]
    assert submit.main(args) == 0
    run_dir = user_project / "out" / "mine"
    summary = storage.read_json(run_dir / "summary.json")
    assert summary["accumulation_steps"] == 4 and summary["effective_batch_size"] == 64
    assert summary["stop_reason"] == "target_reached"
    assert summary["steps_to_target"] == summary["optimizer_steps"]
    assert summary["samples_to_target"] == 64 * summary["steps_to_target"]
    assert summary["time_to_target_s"] > 0 and summary["best_metric"]["value"] >= 0.9
    assert storage.load_torch(run_dir / "model.pt")["state_dict"]["1.weight"].shape == (12, 6)
    rows_before = (run_dir / "metrics.jsonl").read_text()

    # the same run id again: it resumes from the final checkpoint and changes nothing
    assert submit.main(args) == 0
    again = storage.read_json(run_dir / "summary.json")
    assert again["resumed_from_step"] == summary["optimizer_steps"]
    assert again["test"] == summary["test"] and again["best_metric"] == summary["best_metric"]
    assert (run_dir / "metrics.jsonl").read_text() == rows_before

    capsys.readouterr()
    assert submit.main(args[:-3] + ["train.lr=0.02", "output_dir=out", "run_id=mine"]) == 2
    assert "run_id: mine already exists" in capsys.readouterr().err


def test_bad_data_in_the_pipeline_gives_one_line_and_no_partial_output(tmp_path, capsys, monkeypatch):
    frame = pd.DataFrame({"a": [1.0, np.nan, 3.0] * 10, "target": [0, 1, 1] * 10})
    frame.to_csv(tmp_path / "nan.csv", index=False)
    # As in a plain `python -m pipelines.submit`: no root log handler. kfp's last logging.info
    # would install one on this test's stderr, which a later test sees closed.
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    code = submit.main(["data=file", "data.path=nan.csv", "output_dir=out", "run_id=bad", "--no-progress"])
    assert code == 2
    assert logging.getLogger().handlers == []
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == f"error: data: 10 NaN/inf feature values in {tmp_path / 'nan.csv'} (features a); clean or impute them first"
    assert err[1].startswith("full log: ")
    run_dir = tmp_path / "out" / "bad"
    # the step named as the exit handler found it (components/finalize.py), the error as the step said it
    assert storage.read_json(run_dir / "summary.json") == {"run_id": "bad", "status": "failed", "step": "data_prep",
                                                           "error": err[0][7:]}
    assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "model.pt").exists()
    assert not list((run_dir / outputs.KFP_DIR).rglob("manifest.json")) and not (run_dir / "manifest.json").exists()


def test_the_first_run_is_promoted_and_a_worse_one_keeps_the_champion(tmp_path, capsys):
    """Through kfp's local runner: promote after evaluate, its decision in the published summary
    and in submit's output, the registry at <output_dir>/registry."""
    cheap = [f"output_dir={tmp_path}", "data=digits", "probe.enabled=false", "train.batch_size=32",
             "train.micro_batch_size=32", "tracking.mode=disabled", "--no-progress"]
    assert submit.main([*cheap, "run_id=good", "train.max_steps=60"]) == 0
    good = outputs.read_summary(RunStore.open(str(tmp_path / "good")))
    assert good["promotion"]["promoted"] is True and good["promotion"]["champion"] is None
    assert good["promotion"]["reason"].startswith("run good promoted: no champion yet (test/accuracy ")
    assert Registry.open(str(tmp_path / "registry")).champion()["run_id"] == "good"
    assert f"promotion: promoted: {good['promotion']['reason']}" in capsys.readouterr().out

    assert submit.main([*cheap, "run_id=worse", "train.max_steps=2"]) == 0  # a smaller budget: a worse model
    worse = outputs.read_summary(RunStore.open(str(tmp_path / "worse")))
    decision = worse["promotion"]
    assert decision["promoted"] is False and decision["value"] < good["test"]["accuracy"]
    assert decision["reason"].startswith("champion good kept: test/accuracy ")
    assert decision["champion"]["value"] == good["test"]["accuracy"]
    assert Registry.open(str(tmp_path / "registry")).champion()["run_id"] == "good"
    assert [e["decision"]["run_id"] for e in Registry.open(str(tmp_path / "registry")).history()] == ["good", "worse"]
    assert f"promotion: kept: {decision['reason']}" in capsys.readouterr().out
    # sealed again after promote: the manifest holds the summary with the decision
    manifest = storage.read_json(tmp_path / "worse" / "manifest.json")
    assert manifest["files"]["summary.json"]["sha256"] == storage.sha256_file(tmp_path / "worse" / "summary.json")
