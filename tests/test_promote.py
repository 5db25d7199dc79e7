"""Champion/challenger promotion (components/promote.py) over the registry (components/registry.py):
decisions on real trained digits models, for a max metric (accuracy) and a min one (loss); a
changed test data version re-scores the champion; diverged and failed runs are never promoted;
the pointer and history on a local directory and on the moto S3 server; racing promotions."""

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from components import datasets, evaluate, promote, run_store, storage, train
from components.config import DataConfig, parse_config
from components.errors import ConfigError, StorageError
from components.predict import Predictor
from components.registry import POINTER, Registry, entry_key
from components.run_store import RunStore
from conftest import config
import wandb_files

ROOT = Path(__file__).resolve().parents[1]
# steps of training per run: test accuracy and loss improve from each to the next (checked below)
RUNS = {"weak": 3, "weak_twin": 3, "mid": 15, "strong": 120}
METRICS = [("val/accuracy", "accuracy", "max"), ("val/loss", "loss", "min")]


def raw_config(root, run_id, monitor="val/accuracy", registry=None, seed=0, **sections):
    return config(data={"name": "digits", "seed": seed}, eval={"monitor": monitor, "mode": None},
                  registry=registry or {}, output_dir=str(root / "runs"), run_id=run_id, **sections).to_dict()


def trained(root, run_id, steps, dataset, seed=0, **train_overrides):
    """train.run then evaluate.run, as the pipeline calls them: a sealed run and its summary."""
    raw = raw_config(root, run_id, seed=seed, train={"max_steps": steps, **train_overrides})
    run_dir = root / "runs" / run_id
    outcome = train.run(raw, str(dataset), str(run_dir / train.MODEL_FILE), str(run_dir), progress=False)
    return {"summary": evaluate.run(raw, str(dataset), str(run_dir / train.MODEL_FILE), outcome, str(run_dir)),
            "dir": run_dir, "model": run_dir / train.MODEL_FILE}


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """Datasets A (digits, split seed 0) and B (split seed 1: another test data version), runs on
    A of increasing quality, a run on B, and one that diverged (no model)."""
    root = tmp_path_factory.mktemp("lab")
    data = {}
    for name, seed in (("A", 0), ("B", 1)):
        datasets.save(datasets.build(DataConfig(seed=seed)), root / name)
        data[name] = root / name
    runs = {run_id: trained(root, run_id, steps, data["A"]) for run_id, steps in RUNS.items()}
    runs["on_b"] = trained(root, "on_b", 40, data["B"], seed=1)
    runs["diverged"] = trained(root, "diverged", 40, data["A"], lr=1e6)
    tests = [runs[r]["summary"]["test"] for r in ("weak", "mid", "strong")]
    assert tests[0]["accuracy"] < tests[1]["accuracy"] < tests[2]["accuracy"]
    assert tests[0]["loss"] > tests[1]["loss"] > tests[2]["loss"]
    assert runs["weak"]["summary"]["test"] == runs["weak_twin"]["summary"]["test"]  # same seed: same model
    return {"root": root, "data": data, "runs": runs}


def promote_run(lab, run_id, registry_uri, monitor="val/accuracy", min_improvement=0.0, summary=None,
                data="A", **sections):
    run = lab["runs"][run_id]
    raw = raw_config(lab["root"], run_id, monitor, {"uri": str(registry_uri), "min_improvement": min_improvement},
                     seed=0 if data == "A" else 1, **sections)
    return promote.run(raw, summary or run["summary"], str(run["model"]), str(lab["data"][data]), str(run["dir"]))


def value(lab, run_id, metric):
    return lab["runs"][run_id]["summary"]["test"][metric]


# ---------------------------------------------------------------------------- decisions

@pytest.mark.parametrize("monitor, metric, mode", METRICS)
def test_the_first_model_is_promoted_and_a_better_one_replaces_it_by_the_measured_margin(lab, tmp_path, monitor,
                                                                                           metric, mode):
    first = promote_run(lab, "weak", tmp_path / "reg", monitor)
    assert first["promoted"] and "no champion yet" in first["reason"] and first["champion"] is None
    second = promote_run(lab, "mid", tmp_path / "reg", monitor)
    gain = value(lab, "mid", metric) - value(lab, "weak", metric)
    assert second["promoted"] and second["improvement"] == (gain if mode == "max" else -gain) > 0
    assert (second["metric"], second["mode"], second["champion"]["run_id"]) == (f"test/{metric}", mode, "weak")
    assert second["champion"]["value"] == value(lab, "weak", metric) and not second["champion"]["rescored"]
    champion = Registry.open(str(tmp_path / "reg")).champion()
    assert (champion["run_id"], champion["value"], champion["metric"]) == ("mid", value(lab, "mid", metric), metric)
    assert champion["test_data_version"] == lab["runs"]["mid"]["summary"]["data_version"]
    assert champion["model_uri"] == str(lab["runs"]["mid"]["dir"] / train.MODEL_FILE)


@pytest.mark.parametrize("monitor, metric, mode", METRICS)
def test_a_worse_or_equal_model_keeps_the_champion(lab, tmp_path, monitor, metric, mode):
    promote_run(lab, "weak", tmp_path / "reg", monitor)
    equal = promote_run(lab, "weak_twin", tmp_path / "reg", monitor)  # its own run, the same numbers
    assert not equal["promoted"] and equal["improvement"] == 0 and "not > 0" in equal["reason"]
    promote_run(lab, "strong", tmp_path / "reg", monitor)
    worse = promote_run(lab, "mid", tmp_path / "reg", monitor)
    assert not worse["promoted"] and worse["improvement"] < 0 and worse["reason"].startswith("champion strong kept")
    assert Registry.open(str(tmp_path / "reg")).champion()["run_id"] == "strong"


@pytest.mark.parametrize("monitor, metric, mode", METRICS)
def test_min_improvement_is_the_least_margin_that_promotes(lab, tmp_path, monitor, metric, mode):
    gain = abs(value(lab, "mid", metric) - value(lab, "weak", metric))
    promote_run(lab, "weak", tmp_path / "short", monitor)
    short = promote_run(lab, "mid", tmp_path / "short", monitor, min_improvement=gain * 1.01)
    assert not short["promoted"] and f"< min_improvement {gain * 1.01:g}" in short["reason"]
    promote_run(lab, "weak", tmp_path / "exact", monitor)
    assert promote_run(lab, "mid", tmp_path / "exact", monitor, min_improvement=gain)["promoted"]


def test_a_diverged_or_failed_run_is_never_promoted_even_when_its_numbers_are_better(lab, tmp_path):
    reg = tmp_path / "reg"
    no_model = promote_run(lab, "diverged", reg)  # a real diverged run: no model, no champion made
    assert not no_model["promoted"] and "status diverged" in no_model["reason"]
    assert Registry.open(str(reg)).champion() is None
    promote_run(lab, "weak", reg)
    for status in ("diverged", "failed"):  # the best test numbers, but not a completed run
        summary = {**lab["runs"]["strong"]["summary"], "status": status}
        decision = promote_run(lab, "strong", reg, summary=summary)
        assert not decision["promoted"] and f"status {status}" in decision["reason"]
    history = Registry.open(str(reg)).history()
    assert [(e["decision"]["run_id"], e["decision"]["promoted"]) for e in history] == \
        [("diverged", False), ("weak", True), ("strong", False), ("strong", False)]
    assert [e["champion"] and e["champion"]["run_id"] for e in history] == [None, "weak", "weak", "weak"]


@pytest.mark.parametrize("monitor, metric, mode", METRICS)
def test_after_a_data_change_the_champion_is_re_scored_on_the_new_test_split(lab, tmp_path, monitor, metric, mode):
    promote_run(lab, "strong", tmp_path / "reg", monitor)
    decision = promote_run(lab, "on_b", tmp_path / "reg", monitor, data="B")
    assert decision["champion"]["rescored"] and decision["champion"]["recorded_value"] == value(lab, "strong", metric)
    assert decision["data_version"] != decision["champion"]["recorded_data_version"]
    # evaluated here independently: the champion's own Predictor on B's raw test features
    src = datasets.load_source(DataConfig(seed=1))
    test = datasets.split_indices(src.y, "classification", 0.15, 0.15, seed=1)["test"]
    champion = Predictor.load(lab["runs"]["strong"]["model"])
    expected = {"accuracy": float((champion(src.x[test]) == src.y[test]).mean())}
    flat = (src.x[test].reshape(len(test), -1) - champion.mean) / champion.std
    with torch.no_grad():
        logits = champion.model(torch.as_tensor(flat.reshape(len(test), 1, 8, 8), dtype=torch.float32))
    expected["loss"] = F.cross_entropy(logits, torch.as_tensor(src.y[test])).item()
    assert decision["champion"]["value"] == pytest.approx(expected[metric], rel=1e-5)
    improvement = value(lab, "on_b", metric) - decision["champion"]["value"]
    assert decision["improvement"] == pytest.approx(improvement if mode == "max" else -improvement)
    assert decision["promoted"] == (decision["improvement"] > 0)


# ---------------------------------------------------------------------------- the registry

def test_conditional_writes_let_one_writer_win_on_both_backends(s3_server, s3_bucket, tmp_path):
    from components.config import StorageConfig

    for store in (RunStore.open(str(tmp_path / "reg")),
                  RunStore.open(f"s3://{s3_bucket}/reg", StorageConfig(endpoint_url=s3_server.endpoint_url))):
        assert store.create_bytes("k.json", b"1") and not store.create_bytes("k.json", b"2")
        data, tag = store.read_tagged("k.json")
        assert data == b"1" and store.read_tagged("missing.json") is None
        assert store.replace_bytes("k.json", b"3", tag) and not store.replace_bytes("k.json", b"4", tag)
        assert store.get_bytes("k.json") == b"3" and not store.replace_bytes("missing.json", b"5", tag)
        assert store.list() == ["k.json"]  # no temp or lock file shows


def test_the_registry_on_s3_holds_pointer_history_and_re_scores_a_champion_stored_there(lab, s3_server,
                                                                                      s3_bucket, tmp_path):
    on_s3 = {"storage": {"endpoint_url": s3_server.endpoint_url}}
    settings = run_store.settings_of(on_s3)
    reg = f"s3://{s3_bucket}/registry"

    def promote_from_s3(run_id, data="A"):  # the run published to S3, as a cluster's is
        run, uri = lab["runs"][run_id], f"s3://{s3_bucket}/runs/{run_id}"
        RunStore.open(uri, settings).publish(run["dir"])
        raw = raw_config(lab["root"], run_id, registry={"uri": reg}, seed=0 if data == "A" else 1, **on_s3)
        return promote.run(raw, run["summary"], str(run["model"]), str(lab["data"][data]), uri)

    assert promote_from_s3("weak")["promoted"] and promote_from_s3("strong")["promoted"]
    pointer = json.loads(s3_server.client().get_object(Bucket=s3_bucket, Key=f"registry/{POINTER}")["Body"].read())
    assert pointer["seq"] == 2 and pointer["champion"]["model_uri"] == f"s3://{s3_bucket}/runs/strong/model.pt"
    decision = promote_from_s3("on_b", data="B")  # strong's model.pt comes back from S3 to be re-scored
    promote_run(lab, "strong", tmp_path / "local")
    assert decision["champion"]["rescored"] and decision["champion"]["value"] == \
        promote_run(lab, "on_b", tmp_path / "local", data="B")["champion"]["value"]
    history = Registry.open(reg, settings).history()
    assert [e["seq"] for e in history] == [1, 2, 3]
    assert history[-1]["decision"] == {k: v for k, v in decision.items()
                                       if k not in ("seq", "registry", "wandb_report")}


def racing(monkeypatch, n=2):
    """Make the first `n` reads of the newest entry wait for each other: every promotion decides
    against the same champion, so all but one lose the race for the next number."""
    barrier, read = threading.Barrier(n, timeout=30), Registry.head
    waited = set()

    def head(self):
        entry = read(self)
        if len(waited) < n and threading.get_ident() not in waited:
            waited.add(threading.get_ident())
            barrier.wait()
        return entry

    monkeypatch.setattr(Registry, "head", head)


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_two_promotions_at_once_end_with_one_champion_and_both_outcomes(lab, tmp_path, monkeypatch, request,
                                                                        backend):
    sections = {}
    if backend == "s3":
        server, bucket = request.getfixturevalue("s3_server"), request.getfixturevalue("s3_bucket")
        reg, sections = f"s3://{bucket}/registry", {"storage": {"endpoint_url": server.endpoint_url}}
    else:
        reg = tmp_path / "reg"
    promote_run(lab, "weak", reg, **sections)
    racing(monkeypatch)
    results = {}
    threads = [threading.Thread(target=lambda r=r: results.setdefault(r, promote_run(lab, r, reg, **sections)))
               for r in ("mid", "strong")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    registry = Registry.open(str(reg), run_store.settings_of(sections))
    history = registry.history()
    # both decided against weak; the loser decided again against the winner: strong ends champion
    # whichever landed first, and the history holds one outcome for each
    assert [e["seq"] for e in history] == [1, 2, 3] and {e["decision"]["run_id"] for e in history[1:]} == {"mid", "strong"}
    assert registry.champion()["run_id"] == "strong" and registry.pointer()["seq"] == 3
    assert registry.pointer()["champion"] == history[-1]["champion"]
    assert results["strong"]["promoted"] and {results["mid"]["seq"], results["strong"]["seq"]} == {2, 3}


def test_two_promote_processes_at_once(lab, tmp_path):
    reg = tmp_path / "reg"
    promote_run(lab, "weak", reg)
    procs = []
    for run_id in ("strong", "mid"):
        run = lab["runs"][run_id]
        cfg_path, summary_path = tmp_path / f"{run_id}.json", tmp_path / f"{run_id}-summary.json"
        storage.write_json(cfg_path, raw_config(lab["root"], run_id, registry={"uri": str(reg)}))
        storage.write_json(summary_path, run["summary"])
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "components.promote", "--config", str(cfg_path), "--summary", str(summary_path),
             "--model", str(run["model"]), "--dataset", str(lab["data"]["A"]), "--run-dir", str(run["dir"]),
             "--out", str(tmp_path / f"{run_id}-decision.json")], cwd=ROOT, env={**os.environ, "WANDB_MODE": "disabled"}))
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    registry = Registry.open(str(reg))
    assert registry.champion()["run_id"] == "strong" and len(registry.history()) == 3
    assert storage.read_json(tmp_path / "strong-decision.json")["promoted"]


def test_a_missing_pointer_is_rewritten_and_a_corrupted_one_stops_with_one_line(lab, tmp_path, capsys):
    reg = tmp_path / "reg"
    promote_run(lab, "weak", reg)
    (reg / POINTER).unlink()  # a crash between the entry and the pointer: the history is the truth
    assert Registry.open(str(reg)).champion()["run_id"] == "weak" and Registry.open(str(reg)).pointer() is None
    promote_run(lab, "strong", reg)
    assert Registry.open(str(reg)).pointer()["champion"]["run_id"] == "strong"

    (reg / POINTER).write_text('{"seq": ')
    with pytest.raises(StorageError) as err:
        promote_run(lab, "mid", reg)
    assert len(str(err.value).splitlines()) == 1 and "champion.json: corrupted: not valid JSON" in str(err.value)
    assert len(Registry.open(str(reg)).history()) == 2  # nothing was written
    (reg / entry_key(1)).rename(tmp_path / "aside.json")  # someone removed an entry
    with pytest.raises(StorageError, match=r"history/000000000001\.json: missing, but later entries exist"):
        Registry.open(str(reg)).history()
    (tmp_path / "aside.json").rename(reg / entry_key(1))
    (reg / entry_key(2)).write_text("[]")
    from components import registry

    with pytest.raises(SystemExit) as exit_:
        registry.main([str(reg)])
    line = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(line.splitlines()) == 1
    assert line.endswith(f"{entry_key(2)}: corrupted: not a JSON object; the history is append-only: restore the "
                         "entry from a backup; nothing was changed")


def test_a_champion_whose_model_is_gone_cannot_be_re_scored_and_says_so(lab, tmp_path):
    import shutil

    runs = tmp_path / "runs"
    shutil.copytree(lab["runs"]["weak"]["dir"], runs / "weak")
    copy = {**lab, "runs": {**lab["runs"], "weak": {**lab["runs"]["weak"], "dir": runs / "weak",
                                                     "model": runs / "weak" / train.MODEL_FILE}}}
    promote_run(copy, "weak", tmp_path / "reg")
    (runs / "weak" / train.MODEL_FILE).unlink()
    with pytest.raises(StorageError, match=r"^promote: cannot re-score champion weak on test data \w+: .*model.pt: "
                                           r"not found"):
        promote_run(lab, "on_b", tmp_path / "reg", data="B")


@pytest.mark.parametrize("registry, message", [
    ({"min_improvement": -0.1}, "registry.min_improvement: must be a finite number >= 0; got -0.1"),
    ({"uri": "gs://b/reg"}, "registry.uri: a local directory or s3://bucket/prefix"),
    ({"wandb_artifact": "my model"}, "registry.wandb_artifact: W&B artifact names take"),
])
def test_registry_settings_are_checked_in_one_line(registry, message):
    raw = config().to_dict()
    with pytest.raises(ConfigError) as err:
        parse_config({**raw, "registry": {**raw["registry"], **registry}})
    assert str(err.value).startswith(message)


# ---------------------------------------------------------------------------- W&B

def test_w_and_b_offline_gets_the_model_and_moves_the_champion_alias_only_on_promotion(lab, tmp_path, monkeypatch):
    import shutil

    monkeypatch.delenv("WANDB_MODE")
    runs = tmp_path / "runs"
    copy = {**lab, "runs": dict(lab["runs"])}
    for run_id in ("strong", "weak"):  # their own copies: the step adds its W&B files to the run
        shutil.copytree(lab["runs"][run_id]["dir"], runs / run_id)
        copy["runs"][run_id] = {**lab["runs"][run_id], "dir": runs / run_id, "model": runs / run_id / "model.pt"}
    offline = {"tracking": {"mode": "offline"}}
    assert promote_run(copy, "strong", tmp_path / "reg", **offline)["promoted"]
    assert not promote_run(copy, "weak", tmp_path / "reg", **offline)["promoted"]
    strong, weak = (wandb_files.offline_file(runs / r, r, "promote") for r in ("strong", "weak"))
    assert wandb_files.artifacts(strong) == [("model", {"strong", "champion", "latest"})]
    assert wandb_files.artifacts(weak) == [("model", {"weak", "latest"})]


def test_the_promote_run_is_in_the_runs_w_and_b_group_with_the_decision_in_its_summary(lab, tmp_path, monkeypatch,
                                                                                        capsys):
    import shutil

    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    runs = tmp_path / "runs"
    copy = {**lab, "runs": dict(lab["runs"])}
    for run_id in ("weak", "mid"):
        shutil.copytree(lab["runs"][run_id]["dir"], runs / run_id)
        copy["runs"][run_id] = {**lab["runs"][run_id], "dir": runs / run_id, "model": runs / run_id / "model.pt"}
    first = promote_run(copy, "weak", tmp_path / "reg", tracking={"mode": "offline"})  # a one-off run
    second = promote_run(copy, "mid", tmp_path / "reg", tracking={"mode": "offline", "group": "nightly"})
    settings = [wandb_files.run_settings(wandb_files.offline_file(runs / r, r, "promote")) for r in ("weak", "mid")]
    assert [(s["id"], s["group"], s["job_type"]) for s in settings] == [("weak-promote", "weak", "promote"),
                                                                          ("mid-promote", "nightly", "promote")]
    summary = wandb_files.summary(wandb_files.offline_file(runs / "mid", "mid", "promote"))
    assert summary == {"promotion/promoted": True, "promotion/reason": second["reason"],
                       "promotion/value": value(lab, "mid", "accuracy"), "promotion/improvement": second["improvement"],
                       "promotion/time_to_target_s": None, "promotion/champion_run_id": "weak",
                       "promotion/champion_value": value(lab, "weak", "accuracy"), "promotion/seq": 2}
    # the group and time to target are in the history too: the group's W&B report reads them
    history = Registry.open(str(tmp_path / "reg")).history()
    assert [(e["decision"]["wandb_group"], e["decision"]["time_to_target_s"]) for e in history] == \
        [("weak", None), ("nightly", None)]
    # offline: no report, said in one line before the decision (the step's last line, its status)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("promote: ")]
    skipped = "promote: W&B report skipped: no WANDB_API_KEY in the environment (a report is saved on W&B's server)"
    assert lines == [skipped, f"promote: {first['reason']}", skipped, f"promote: {second['reason']}"]
    assert first["wandb_report"] is None and second["wandb_report"] is None


def test_online_the_groups_report_is_created_then_updated_and_its_url_printed_and_returned(lab, tmp_path,
                                                                                            monkeypatch, capsys):
    """W&B's server cannot run here: the promote runs' W&B calls are off (disabled Tracker) and the
    report goes to a recorder (tests/test_wandb_review.py holds the contract test of the real save)."""
    from dataclasses import replace

    from components.tracking import Tracker

    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.setattr(promote, "Tracker", lambda cfg, *args, **kw: Tracker(replace(cfg, mode="disabled"), *args, **kw))
    saver, reg, scheduled = wandb_files.Recorder(), tmp_path / "reg", {"mode": "online", "group": "nightly"}
    results = []
    for run_id in ("weak", "strong"):
        run = lab["runs"][run_id]
        raw = raw_config(lab["root"], run_id, registry={"uri": str(reg)}, tracking=scheduled)
        results.append(promote.run(raw, run["summary"], str(run["model"]), str(lab["data"]["A"]), str(run["dir"]),
                                   reports=saver))
    url = results[0]["wandb_report"]
    assert url.endswith("--Vmlldzo1") and results[1]["wandb_report"] == url
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("promote: ")]
    assert lines == [f"promote: W&B report created: {url}", f"promote: {results[0]['reason']}",
                     f"promote: W&B report updated: {url}", f"promote: {results[1]['reason']}"]
    (first, none), (second, link) = saver.saved
    assert none is None and link["id"] == "Vmlldzo1"
    assert [row.split("|")[3].strip() for row in second.blocks[5].text.splitlines()[2:]] == ["weak", "strong"]
    assert Registry.open(str(reg)).report_link("nightly")["url"] == url
