"""The convergence study: the plan of runs, the aggregation and answer, and the whole study
through kfp's local runner on digits."""

import base64
import math
import re

import pytest
import torch
import yaml

from components import data_prep, lr_search, models, storage, study, study_summary
from components.config import Config, parse_config
from components.errors import ConfigError, DataError
from components.training import Trainer
from pipelines import outputs, submit
from pipelines.config import compose_config
from study_helpers import PROBE, row, study_config

def wandb_records(path):
    """The records of an offline W&B run file. wandb 0.31 ships no reader for it; the file is a
    7-byte header, then LevelDB-style log records (32 KiB blocks; per chunk a 7-byte header:
    checksum, length, type 1 full / 2 first / 3 middle / 4 last) holding protobuf Records."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, records, pending = 7, [], b""
    while pos + 7 <= len(data):
        room = 32768 - pos % 32768
        if room < 7:  # a block's tail too short for a header is padding
            pos += room
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_run_info(path):
    """(group, job type, summary keys) of an offline W&B run file."""
    records = wandb_records(path)
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    keys = {u.key for r in records if r.WhichOneof("record_type") == "summary" for u in r.summary.update}
    return run.run_group, run.job_type, keys


def test_default_ladder_is_centred_on_the_probe_and_clipped_to_the_data():
    config = study_config()
    assert study.batch_ladder(config, 1259, PROBE) == [8, 16, 32, 64, 128, 256, 512]  # 64 / 8 .. 64 x 8
    assert study.batch_ladder(config, 300, PROBE) == [8, 16, 32, 64, 128]  # up to half the split
    config["study"]["ladder_doublings"] = 1
    assert study.batch_ladder(config, 1259, PROBE) == [32, 64, 128]
    config["study"]["batch_sizes"] = [256, 16, 16, 64]
    assert study.batch_ladder(config, 1259, None) == [16, 64, 256]
    config["study"]["batch_sizes"] = None
    with pytest.raises(Exception, match="study.batch_sizes: give the batch sizes"):
        study.batch_ladder(config, 1259, None)


def test_plan_fixes_micro_batch_budget_and_each_runs_lr_seed_and_cadence():
    config = study_config(batch_sizes=[16, 96], seeds=2, lr_grid=[0.5, 2.0])
    entries = study.plan(config, 1259, PROBE)
    assert [(e["name"], e["batch_size"], e["steps_per_epoch"]) for e in entries] == [("b16", 16, 78), ("b96", 96, 13)]
    big = entries[1]
    # micro-batch: the largest that fits (24 from the probe) and divides the batch
    assert (big["config"]["train"]["batch_size"], big["micro_batch_size"]) == (96, 24)
    assert entries[0]["micro_batch_size"] == 16 and big["budget_steps"] == 30 * 13
    run = study.run_config(big, "b96-lr2x-s1", 2.0, 1, every=3, cap=None)
    assert run["train"]["micro_batch_size"] == 24
    assert run["train"]["lr"] == pytest.approx(0.05 * 2.0)  # the multiplier; lr_scaling applies on top
    assert run["train"]["seed"] == 1 and run["train"]["max_epochs"] == 30 and run["train"]["max_steps"] is None
    assert run["eval"]["every_steps"] == 3 and run["eval"]["target"] == 0.95
    assert run["eval"]["patience"] == study.NEVER  # stop at the target or the budget
    assert run["run_id"] == "s1-b96-lr2x-s1" and run["tracking"]["group"] == "s1"
    assert run["pipeline"] == "train" and run["probe"]["enabled"] is False
    capped = study.run_config(big, study.run_name(96, 0.5, 0, lr_search.REMEASURE), 0.5, 0, every=1, cap=40)
    assert capped["train"]["max_steps"] == 40 and capped["run_id"] == "s1-b96-lr0.5x-s0-fine"
    assert study.run_name(96, 0.5, 0, lr_search.LONGER, attempt=2) == "b96-lr0.5x-s0-longer2"
    assert config["train"]["batch_size"] == "auto"  # the study's own config is untouched


def test_a_capped_search_run_is_the_uncapped_run_stopped_early_also_under_a_cosine_schedule(digits, tmp_path):
    """A cap stops a search run once it cannot win; its LR schedule still spans the batch's budget.
    Before, a cosine decayed over the cap instead (at step 30 of a 40-step cap ~1/3 of the LR it
    should have had), so capped runs trained at a lower LR than the run they were compared with.
    Under a constant schedule nothing changes, and a run's config hash stays what it was."""
    config = study_config(batch_sizes=[64], max_epochs=3)  # a budget of 57 steps: past the cap, quick
    config["train"].update(schedule="cosine", warmup_steps=5)
    config["eval"]["target"] = 2.0  # never met: both runs train to their limit
    entry = study.plan(config, 1259, PROBE)[0]
    losses, lrs = {}, {}
    for cap in (None, 40):
        run = study.run_config(entry, f"b64-cap{cap}", 1.0, 0, every=10, cap=cap)
        cfg = parse_config(run)
        run_dir = tmp_path / f"cap{cap}"
        torch.manual_seed(0)  # the same initial weights (components/train.py seeds before building)
        Trainer(models.build_model(cfg.model, digits.input_shape, digits.output_dim), digits, cfg, run_dir=run_dir,
                progress=False).fit()
        rows = [r for r in storage.read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in r]
        losses[cap], lrs[cap] = [r["train/loss"] for r in rows], [r["lr"] for r in rows]
    assert len(lrs[40]) == 40 and len(lrs[None]) == 57
    assert lrs[40] == lrs[None][:40] and losses[40] == losses[None][:40]
    assert lrs[40][30] > 0.4 * lrs[40][5]  # half-way down a decay over 57 steps (over the cap of 40: 0.19)
    constant = study.plan(study_config(batch_sizes=[64]), 1259, PROBE)[0]  # the default schedule: left unset
    assert study.run_config(constant, "b64", 1.0, 0, every=10, cap=40)["train"]["schedule_steps"] is None


def test_a_study_can_train_past_the_target_to_compare_trained_models():
    config = study_config(batch_sizes=[64])
    config["eval"].update(stop_at_target=False, patience=3)
    entry = study.plan(config, 1259, PROBE)[0]
    run = study.run_config(entry, "b64-lr1x-s0", 1.0, 0, every=4, cap=None)
    assert run["eval"]["stop_at_target"] is False
    assert run["eval"]["patience"] == math.ceil(3 * 19 / 4)  # the same 3 epochs (19 steps each), every 4 steps
    rows = [row(b, round(40 * (1 + 200 / b)), seed=s, test=t)
            for b, tests in ((16, (0.96, 0.962)), (512, (0.958, 0.96))) for s, t in enumerate(tests)]
    line = study.summarize({**config, "study": {**config["study"], "seeds": 2}}, rows, None)["answer"][-1]
    assert line.startswith("Generalization after training on past the target: largest batch 512")
    assert "within twice the seed-to-seed spread" in line


def test_the_answer_names_seeds_that_missed_the_target_in_a_fitted_batch():
    rows = [row(b, round(40 * (1 + 200 / b)), seed=s) for b in (16, 64, 256) for s in (0, 1, 2)]
    rows[4] = row(64, None, seed=1)  # one seed of 64 missed: the median of the other two still counts
    result = study.summarize(study_config(seeds=3, lr_grid=None), rows, None)
    assert result["fit"]["error"] is None and result["fit"]["n_points"] == 8
    assert result["batches"][1]["missed"] == ["b64-lr1x-s1"]
    assert ("Seeds that missed val/accuracy 0.95 at their batch's chosen LR (the batch is fitted from its other "
            "seeds): batch 64 (b64-lr1x-s1).") in result["answer"]
    assert "One LR per batch (study.lr_grid=null): the linear rule's LR (0.05 at batch 32), not re-tuned." \
        in result["answer"]


def test_a_real_divergence_is_detected_labelled_and_retried(tmp_path):
    """A huge LR on a tiny budget, trained for real: every attempt diverges, each in its own
    run directory, at half the LR of the one before."""
    config = study_config(batch_sizes=[64], lr_grid=None, max_steps=6)
    config["train"].update(lr=1e6, micro_batch_size=64)
    config["probe"]["enabled"] = False
    data_prep.run(config, str(tmp_path / "dataset"))
    manifest = storage.read_json(tmp_path / "dataset" / "manifest.json")
    (entry,) = study.plan(config, manifest["counts"]["train"], None, manifest)
    rows = study.run_batch(entry, str(tmp_path / "dataset"), str(tmp_path / "study"))
    assert [r["name"] for r in rows] == ["b64-lr1x-s0", "b64-lr0.5x-s0", "b64-lr0.25x-s0"]
    assert [r["status"] for r in rows] == ["diverged"] * 3
    assert [r["lr"] for r in rows] == pytest.approx([2e6, 1e6, 5e5])  # linear rule: 1e6 x 64/32
    for r in rows:
        assert not r["reached_target"] and r["steps_to_target"] is None
        assert storage.read_json(tmp_path / "study" / r["run_dir"] / "summary.json")["status"] == "diverged"
    result = study.summarize(config, rows, None)
    assert result["fit"]["error"] == "no run reached the target: cannot fit the critical batch size"
    assert not any(r["selected"] for r in rows)


def test_a_run_the_trainer_calls_diverged_is_diverged_in_its_row_and_its_steps_are_not_a_result():
    from components.run_record import RunRecord

    summary = {"run_id": "r", "status": "diverged", "stop_reason": "diverged", "steps_to_target": 20,
               "samples_to_target": 640, "divergence": {"rule": "collapse", "step": 40},
               "best_metric": {"value": 0.94}, "counts": {"train": 1259}, "test": {"accuracy": 0.1},
               "optimizer_steps": 40, "wall_time_s": 1.0, "eval_time_s": 0.25}
    row = study.row_from(RunRecord.from_dict(summary), "val/accuracy", [])
    assert (row["status"], row["divergence"]["rule"], row["reached_target"]) == ("diverged", "collapse", False)
    assert row["steps_to_target"] is None and row["samples_to_target"] is None and row["test_metric"] == 0.1
    row = study.row_from(RunRecord.from_dict({**summary, "status": "completed", "divergence": None}),
                         "val/accuracy", [])
    assert (row["status"], row["steps_to_target"], row["epochs_to_target"]) == ("completed", 20, 640 / 1259)
    assert row["train_time_s"] == 0.75


def test_a_runs_pace_is_timed_from_warm_steps_without_its_evaluations():
    rows = [{"step": 1, "wall_time_s": 0.5, "train/loss": 1.0}]  # the first step: start-up
    t = 0.5
    for step in range(2, 200):
        t += 0.00043 if step > 3 else 0.05  # the first steps are slow
        rows.append({"step": step, "wall_time_s": round(t, 4), "train/loss": 1.0})  # 0.1 ms, as the trainer writes
        if step % 5 == 0:  # an evaluation, 10 ms, is not training
            t += 0.01
            rows.append({"step": step, "wall_time_s": round(t, 4), "val/accuracy": 0.5})
    assert study.warm_seconds_per_step(rows) == pytest.approx(0.00043, rel=0.03)
    # single steps snap to the 0.1 ms grid: their median is 0.4 ms or 0.5 ms, never 0.43
    assert study.warm_seconds_per_step(rows, block=1) in (pytest.approx(0.0004), pytest.approx(0.0005))


def test_plan_refuses_a_batch_larger_than_the_training_split():
    with pytest.raises(DataError, match="batch 4096 is larger than the training split"):
        study.plan(study_config(batch_sizes=[64, 4096]), 1259, PROBE)


def test_a_study_needs_a_target():
    with pytest.raises(ConfigError, match="^eval.target: the study measures steps to a target"):
        compose_config(["pipeline=study", "eval.target=null"])
    with pytest.raises(ConfigError, match="^study.seeds: must be > 0"):
        compose_config(["pipeline=study", "study.seeds=0"])
    with pytest.raises(ConfigError, match="^study.batch_sizes: with probe.enabled=false, list the batch sizes"):
        compose_config(["pipeline=study", "probe.enabled=false"])


def test_summary_fits_the_critical_batch_and_answers_in_plain_language():
    s_min, b_crit = 40.0, 200.0
    rows = [row(b, round(s_min * (1 + b_crit / b))) for b in (16, 32, 64, 128, 256, 512, 1024)]
    rows.append(row(64, 2000, multiplier=0.25))  # an LR-grid alternative that is slower
    rows.append(row(2048, None))  # missed the target within its budget
    result = study.summarize(study_config(lr_grid=[0.25, 1.0]), rows, PROBE)
    assert result["fit"]["error"] is None
    assert result["fit"]["b_crit"] == pytest.approx(b_crit, rel=0.05)
    assert result["fit"]["s_min"] == pytest.approx(s_min, rel=0.05)
    by_batch = {b["batch_size"]: b for b in result["batches"]}
    assert by_batch[64]["lr_multiplier"] == 1.0 and by_batch[64]["steps_to_target"]["median"] == 165
    assert [r["selected"] for r in rows if r["batch_size"] == 64] == [True, False]
    assert by_batch[2048]["reached"] == 0 and by_batch[2048]["steps_to_target"] is None
    assert by_batch[16]["regime"] == "perfect scaling" and by_batch[1024]["regime"] == "no further gain"
    assert by_batch[200 if 200 in by_batch else 256]["regime"] == "diminishing returns"
    # fewest samples at the smallest batch; fastest where steps x step time is least
    times = {b: round(s_min * (1 + b_crit / b)) * (0.001 + b * 1e-5) for b in (16, 32, 64, 128, 256, 512, 1024)}
    assert result["best"]["samples"]["batch_size"] == 16
    assert result["best"]["time"]["batch_size"] == min(times, key=times.get)
    assert result["best"]["time"]["predicted_time_s"] == pytest.approx(times[min(times, key=times.get)], rel=0.05)
    assert by_batch[64]["seconds_per_step"] == pytest.approx(0.001 + 64e-5)
    text = "\n".join(result["answer"])
    assert f"Batch {min(times, key=times.get)} reaches val/accuracy 0.95 fastest" in text
    assert re.search(r"B_crit ~ (19\d|20\d) ", text) and "saves fewer than 25% of the steps" in text
    assert "costs over 50% more samples" in text
    assert "Batch 2048 did not reach val/accuracy 0.95 within the budget" in text
    assert "one seed per batch" in text and "LR re-tuned per batch" in text
    assert result["probe"]["b_simple"] == 150.0 and result["target"]["value"] == 0.95


def test_the_fastest_batch_uses_the_probes_throughput_when_there_is_one():
    rows = [row(b, round(40 * (1 + 200 / b))) for b in (16, 32, 64, 128, 256)]
    # throughput flat from 16 up: a step costs time in proportion to its batch, so the fewest
    # samples (the smallest batch) is also the fastest, whatever the runs' own paces say
    flat = {**PROBE, "throughput_ladder": [{"micro_batch_size": 16, "samples_per_s": 1e5},
                                           {"micro_batch_size": 1024, "samples_per_s": 1e5}]}
    result = study.summarize(study_config(), rows, flat)
    assert result["best"]["time"]["batch_size"] == 16
    by_batch = {b["batch_size"]: b for b in result["batches"]}
    assert by_batch[64]["probe_seconds_per_step"] == pytest.approx(64 / 1e5)
    assert by_batch[64]["predicted_time_s"] == pytest.approx(by_batch[64]["probe_seconds_per_step"] * 40 * (1 + 200 / 64),
                                                             rel=0.02)
    # without the ladder, the runs' paces (which favour 128 here) decide
    assert study.summarize(study_config(), rows, PROBE)["best"]["time"]["batch_size"] == 128


def test_the_predicted_pace_counts_the_loops_noise_measuring_steps():
    from components import study_summary

    ladder = [{"micro_batch_size": 16, "samples_per_s": 5e4}, {"micro_batch_size": 64, "samples_per_s": 1e5}]
    train = parse_config(study_config()).train  # noise tracked; without accumulation every 16th step is split
    # batch 64 in one micro-batch: 0.64 ms a step; a measuring step runs two halves of 32 at 7.5e4 samples/s
    assert study_summary.probe_seconds_per_step(ladder, 64, 64, train) == pytest.approx(
        64 / 1e5 + (64 / 7.5e4 - 64 / 1e5) / 16)
    assert study_summary.probe_seconds_per_step(ladder, 64, 32, train) == pytest.approx(64 / 7.5e4)  # 32 x 2
    train.track_noise_scale = False
    assert study_summary.probe_seconds_per_step(ladder, 64, 64, train) == pytest.approx(64 / 1e5)


def test_the_predicted_pace_adds_the_trainers_own_cost_per_step_once_per_optimizer_step():
    from components import study_summary

    ladder = [{"micro_batch_size": 16, "samples_per_s": 5e4}, {"micro_batch_size": 64, "samples_per_s": 1e5}]
    train = parse_config(study_config()).train
    overhead = 1e-4  # components/loop_pace.py measured 0.1 ms a step beyond the ladder's
    assert study_summary.probe_seconds_per_step(ladder, 64, 32, train, overhead) == pytest.approx(64 / 7.5e4 + 1e-4)
    assert study_summary.probe_seconds_per_step(ladder, 64, 64, train, overhead) == pytest.approx(
        64 / 1e5 + 1e-4 + (64 / 7.5e4 - 64 / 1e5) / 16)  # a split step is still one optimizer step
    rows = [row(b, round(40 * (1 + 200 / b))) for b in (16, 32, 64, 128, 256)]
    flat = {**PROBE, "throughput_ladder": [{"micro_batch_size": 16, "samples_per_s": 1e5},
                                           {"micro_batch_size": 1024, "samples_per_s": 1e5}],
            "loop": {"overhead_s": 1e-3}}
    by_batch = {b["batch_size"]: b for b in study.summarize(study_config(), rows, flat)["batches"]}
    assert by_batch[64]["probe_seconds_per_step"] == pytest.approx(64 / 1e5 + 1e-3)
    # 1 ms a step outweighs 0.16 ms of samples at batch 16: fewer, bigger steps are faster now
    assert study.summarize(study_config(), rows, flat)["best"]["time"]["batch_size"] > 16


def test_summary_without_enough_runs_reaching_the_target_keeps_the_rows_and_says_why():
    rows = [row(16, 300), row(64, 90), row(256, None), row(512, None)]
    result = study.summarize(study_config(), rows, None)
    assert "at least 3" in result["fit"]["error"] and len(result["runs"]) == 4
    assert any(line.startswith("No fit of the critical batch: ") for line in result["answer"])
    nobody = study.summarize(study_config(), [row(16, None), row(64, None)], None)
    assert "no run reached the target" in nobody["fit"]["error"]
    assert nobody["best"] == {"time": None, "samples": None}
    assert nobody["answer"][0].startswith("No batch size reached val/accuracy 0.95")


def test_the_generalization_check_uses_the_seed_spread():
    rows = [row(b, round(40 * (1 + 200 / b)), seed=s, test=t)
            for b, tests in ((16, (0.96, 0.962)), (64, (0.958, 0.96)), (512, (0.90, 0.91)))
            for s, t in enumerate(tests)]
    result = study.summarize(study_config(seeds=2), rows, None)
    line = result["answer"][-1]
    assert line.startswith("Generalization at the target (eval.stop_at_target=false compares fully trained "
                           "models): largest batch 512 has test/accuracy 0.905 vs best 0.961 at batch 16 (-0.056)")
    assert "beyond twice the seed-to-seed spread" in line


def test_compiled_study_fans_out_the_runs_and_collects_them(tmp_path):
    assert submit.main(["--compile-only", "pipeline=study", f"output_dir={tmp_path}", "run_id=c",
                        "study.parallelism=3", "platform.gpu.count=1"]) == 0
    spec = yaml.safe_load((tmp_path / "c" / "pipeline.yaml").read_text())
    assert set(spec["root"]["dag"]["tasks"]) == {"exit-handler-1", "finalize"}  # the graph inside the exit handler
    tasks = spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    assert set(tasks) == {"resolve-data", "data-prep", "probe", "study-plan", "for-loop-2", "study-report"}
    loop = tasks["for-loop-2"]
    assert loop["parameterIterator"]["items"]["inputParameter"] == "pipelinechannel--study-plan-Output"
    assert loop["iteratorPolicy"]["parallelismLimit"] == 3
    inner = spec["components"]["comp-for-loop-2"]["dag"]["tasks"]
    assert set(inner) == {"study-run"}
    report_rows = tasks["study-report"]["inputs"]["parameters"]["rows"]["taskOutputParameter"]
    assert report_rows["producerTask"] == "for-loop-2"
    executors = spec["deploymentSpec"]["executors"]
    assert executors["exec-study-run"]["container"]["resources"]["accelerator"]["resourceCount"] == "1"
    assert "resources" not in executors["exec-study-report"]["container"]
    assert "convergence-study" in (tmp_path / "c" / "pipeline.yaml").read_text()


def test_small_study_on_digits_end_to_end(tmp_path, monkeypatch, capsys):
    """Three batch sizes through kfp's local runner: study.json, the report with its images
    embedded, and W&B offline runs grouped by the study id."""
    monkeypatch.delenv("WANDB_MODE")  # the default: W&B offline
    args = ["pipeline=study", f"output_dir={tmp_path / 'runs'}", "run_id=mini", "probe.enabled=false",
            "train.micro_batch_size=64", "study.batch_sizes=[16,64,256]", "study.lr_grid=null",
            "study.confirm_seeds=0",
            "eval.target=0.9", "study.max_epochs=40", "--no-progress"]
    assert submit.main(args) == 0
    study_dir = tmp_path / "runs" / "mini"
    result = storage.read_json(study_dir / "study.json")
    assert [b["batch_size"] for b in result["batches"]] == [16, 64, 256]
    assert all(b["reached"] == 1 for b in result["batches"])
    for r in result["runs"]:
        summary = storage.read_json(study_dir / r["run_dir"] / "summary.json")
        assert summary["effective_batch_size"] == r["batch_size"] and summary["stop_reason"] == "target_reached"
        assert summary["micro_batch_size"] == min(64, r["batch_size"])  # 256 = 64 x 4
        assert r["samples_to_target"] == r["steps_to_target"] * r["batch_size"]
        assert r["epochs_to_target"] == pytest.approx(r["samples_to_target"] / 1259)
        # the study's time to target is training time: its frequent evaluations are taken out
        assert 0 < r["time_to_target_s"] < r["wall_time_to_target_s"] == summary["time_to_target_s"]
        assert r["train_time_s"] == pytest.approx(summary["wall_time_s"] - summary["eval_time_s"])
    steps = [b["steps_to_target"]["median"] for b in result["batches"]]
    assert steps[0] > steps[1] > steps[2]  # bigger batches need fewer steps ...
    samples = [b["samples_to_target"]["median"] for b in result["batches"]]
    assert samples[2] > samples[0]  # ... and more samples
    assert result["fit"]["error"] is None and 0 < result["fit"]["b_crit"] < math.inf
    assert result["runs"][2]["gns_b_simple"] is not None  # 256 = 64 x 4 tracks the noise scale

    html = (study_dir / "report.html").read_text()
    images = re.findall(r'data:image/png;base64,([A-Za-z0-9+/=]+)', html)
    assert len(images) >= 5 and all(base64.b64decode(i).startswith(b"\x89PNG\r\n\x1a\n") for i in images)
    assert result["answer"][0].split(":")[0] in html
    assert (study_dir / "steps_to_target.png").exists()

    offline = sorted(p.name.split("-mini-", 1)[1] for p in study_dir.glob("runs/*/wandb/offline-run-*"))
    assert offline == sorted(f"{name}-{job}" for name in ("b16-lr1x-s0", "b64-lr1x-s0", "b256-lr1x-s0")
                             for job in ("train", "evaluate"))
    # every W&B run of the study is in the study's group, with its job type; the fit is in the study run
    runs = [wandb_run_info(f) for f in study_dir.glob("**/wandb/offline-run-*/run-*.wandb")]
    assert sorted(job for _, job, _ in runs) == ["evaluate"] * 3 + ["study"] + ["train"] * 3
    assert {group for group, _, _ in runs} == {"mini"}
    study_keys = next(keys for _, job, keys in runs if job == "study")
    assert {"fit/b_crit", "fit/b_crit_err", "fit/s_min", "fit/e_min", "answer"} <= study_keys
    out = capsys.readouterr().out
    assert "study mini" in out and f"report: {study_dir / 'report.html'}" in out and "wandb sync" in out


def test_a_default_study_with_the_probe_centres_its_ladder_and_prices_its_batches_by_the_probe(tmp_path):
    """pipeline=study as a user runs it, probe on (kept small: one doubling each way, one LR and
    seed per batch): the probe's recommendation centres the ladder, its noise scale is the answer's,
    and each batch's predicted time is the fitted steps x the probe's pace with the trainer's own
    cost per step (components/loop_pace.py) in it."""
    args = ["pipeline=study", f"output_dir={tmp_path / 'runs'}", "run_id=probed", "study.ladder_doublings=1",
            "study.lr_grid=null", "study.confirm_seeds=0", "eval.target=0.9", "tracking.mode=disabled",
            "--no-progress"]
    assert submit.main(args) == 0
    study_dir = tmp_path / "runs" / "probed"
    probe_json, result = storage.read_json(study_dir / "probe.json"), storage.read_json(study_dir / "study.json")
    recommended = probe_json["recommendation"]["effective_batch_size"]
    assert result["probe"]["recommended_batch"] == recommended
    assert result["probe"]["b_simple"] == probe_json["noise_scale"]["b_simple"] > 0
    assert [b["batch_size"] for b in result["batches"]] == [b for b in (recommended // 2, recommended, 2 * recommended)
                                                            if b <= 1259]  # within digits' train split
    loop = probe_json["throughput"]["loop"]
    assert loop["micro_batch_size"] == probe_json["recommendation"]["micro_batch_size"] and loop["overhead_s"] >= 0
    cfg = parse_config(compose_config(args[:-1]))
    ladder = probe_json["throughput"]["ladder"]
    for b in result["batches"]:
        run = next(r for r in result["runs"] if r["batch_size"] == b["batch_size"] and r["selected"])
        pace = study_summary.probe_seconds_per_step(ladder, b["batch_size"], run["micro_batch_size"], cfg.train,
                                                    loop["overhead_s"])
        assert b["probe_seconds_per_step"] == pytest.approx(pace) and pace > loop["overhead_s"]
        assert b["predicted_time_s"] > 0 and b["seconds_per_step"] > 0  # and the runs' own pace beside it
    fastest = min(result["batches"], key=lambda b: b["predicted_time_s"])
    assert result["best"]["time"]["batch_size"] == fastest["batch_size"]
    assert result["best"]["time"]["by"] == "fitted steps x the probe's throughput"
    assert f"B_simple ~ {study_summary._fmt(probe_json['noise_scale']['b_simple'])}" in " ".join(result["answer"])


def test_default_config_is_not_a_study():
    assert Config().pipeline == "train"


def test_contract_the_wandb_report_is_saved_with_the_study_panels_and_its_url_printed(monkeypatch, capsys, tmp_path):
    """Contract test: saving a W&B Report needs a W&B server, which cannot run here, so
    Report.save and Report.url are replaced; the payload that would be sent is asserted."""
    import wandb_workspaces.reports.v2 as wr

    sent = {}

    def save(self, draft=False, clone=False):  # what the real one would send, from the public fields
        sent["blocks"], sent["entity"], sent["project"] = repr(self.blocks), self.entity, self.project
        return self

    monkeypatch.setattr(wr.Report, "save", save)
    monkeypatch.setattr(wr.Report, "url", property(lambda self: f"https://wandb.example/{self.project}/reports/r1"))
    monkeypatch.setenv("WANDB_ENTITY", "team")
    rows = [row(b, round(40 * (1 + 200 / b))) for b in (16, 64, 256)]
    result = study.summarize(study_config(), rows, PROBE)
    url = study.publish_wandb_report(result, parse_config(study_config()).tracking)
    assert url == "https://wandb.example/convergence-pipeline/reports/r1"
    assert (sent["entity"], sent["project"]) == ("team", "convergence-pipeline")
    payload = sent["blocks"]
    assert """filters='Metric("Group") == \\'s1\\''""" in payload  # the runset: the study's W&B group
    assert "x='samples_seen'" in payload and "x='wall_time_s'" in payload
    assert "gns/b_simple" in payload and "val/accuracy" in payload
    assert result["answer"][0].split(":")[0] in payload

    outputs.print_study({**result, "wandb_report": url}, str(tmp_path))
    assert "W&B report: https://wandb.example/convergence-pipeline/reports/r1" in capsys.readouterr().out
