"""The probe across ranks: its memory fit leaves room for each rank's all-reduce buffer (and holds
the optimizer's state), and its scaling is measured by a burst of 2 gloo ranks under the real
launcher (components/scaling.py, components/launch.py), not assumed."""

import pytest
import torch

from components import data_prep, memory, metrics, models, probe, scaling
from conftest import config

AUTO = {"batch_size": "auto", "micro_batch_size": "auto"}


def test_the_memory_fit_across_ranks_leaves_room_for_the_all_reduce_buffer(digits):
    adamw = {**AUTO, "optimizer": "adamw"}
    one_rank, two_ranks = config(train=adamw), config(train={**adamw, "nproc": 2})
    torch.manual_seed(0)
    model = models.build_model(one_rank.model, digits.input_shape, digits.output_dim)
    x, y = (torch.as_tensor(a) for a in digits.split("train"))
    loss_fn = metrics.loss_fn(digits.task)
    # the injected limit: a budget whose usable 90% holds about 600 samples in one process
    alone = memory.cpu_trial(model, loss_fn, x, y, optimizer_state_factor=2.0)  # AdamW
    per_sample = alone(2) - alone(1)
    budget = int((alone(1) + 600 * per_sample) / 0.9)
    usable = 0.9 * budget

    fit1, held1 = probe.memory_fit(one_rank, model, loss_fn, x, y, torch.device("cpu"), budget)
    fit2, held2 = probe.memory_fit(two_ranks, model, loss_fn, x, y, torch.device("cpu"), budget)
    n_params = sum(p.numel() for p in model.parameters())
    # the optimizer's state is in the trial: AdamW's two moments of every float32 parameter
    assert held1 == {"optimizer_state_bytes": 2 * 4 * n_params, "all_reduce_buffer_bytes": 0}
    flat = (n_params + 3) * 4  # every gradient and the step's 3 agreed numbers, float32 (Runtime.agreed_step)
    assert held2 == {"optimizer_state_bytes": 2 * 4 * n_params, "all_reduce_buffer_bytes": flat}
    assert alone(fit1.micro_batch) <= usable < alone(fit1.micro_batch + 1)  # the exact largest, alone
    assert alone(fit2.micro_batch) + flat <= usable < alone(fit2.micro_batch + 1) + flat  # ...with the buffer
    assert fit2.fixed_bytes - fit1.fixed_bytes == pytest.approx(flat)
    assert fit1.micro_batch - fit2.micro_batch == pytest.approx(flat / per_sample, abs=1)
    assert fit1.micro_batch - fit2.micro_batch >= 50  # the digits MLP: ~70 KiB of gradients, ~1 KiB a sample


def test_the_probe_measures_two_ranks_under_torchrun_and_predicts_with_the_measured_pace(tmp_path, monkeypatch,
                                                                                          capsys):
    monkeypatch.setattr(scaling, "TIME_S", 0.3)  # the ranks read it from the job: a short burst
    raw = config(train={**AUTO, "nproc": 2}).to_dict()
    raw["probe"].update(warmup_steps=20, throughput_time_s=0.005, noise_batches=8)
    raw["run_id"] = "p2"
    data_prep.run(raw, str(tmp_path / "data"))
    result = probe.run(raw, str(tmp_path / "data"), str(tmp_path / "out.json"), str(tmp_path / "run"))
    measured, choice = result["scaling"], result["recommendation"]
    micro, accumulation = choice["micro_batch_size"], choice["accumulation_steps"]
    assert measured["measured"] and measured["world_size"] == choice["world_size"] == 2
    assert (measured["micro_batch_size"], measured["accumulation_steps"]) == (micro, accumulation)
    assert choice["effective_batch_size"] == micro * accumulation * 2
    assert measured["ranks_agree"]  # real cross-rank steps: both ranks' weights identical after the burst
    assert measured["steps"] >= scaling.MIN_STEPS and measured["threads_per_rank"] == 1  # OMP_NUM_THREADS=1
    assert measured["time_s"] < 3  # a short burst
    single = probe.throughput_at(result["throughput"]["ladder"], micro)
    assert measured["single_process_samples_per_s"] == single
    assert measured["efficiency"] == pytest.approx(measured["samples_per_s"] / (2 * single), rel=1e-12)
    assert measured["samples_per_s"] > 0 and measured["spread"] >= 0
    # the pace the recommendation predicts is the measured one, not 2 x one process's
    assert choice["samples_per_s"] == pytest.approx(measured["samples_per_s"], rel=1e-12)
    option = next(o for o in result["options"] if o["effective_batch_size"] == choice["effective_batch_size"])
    assert option["goodput"] == pytest.approx(measured["samples_per_s"] * option["statistical_efficiency"])
    line = next(r for r in result["reasoning"] if r.startswith("scaling measured: 2 ranks at micro-batch "))
    assert result["reasoning"].index(line) == len(result["reasoning"]) - 2  # just before the choice
    assert f"probe: {line}" in capsys.readouterr().out
    assert probe.decision(result)["scaling"] == measured  # carried into the summary


def test_where_the_ranks_cannot_start_here_linear_scaling_is_assumed_and_said():
    cfg = config(train={**AUTO, "nproc": 2, "device": "cuda"})  # no GPU here: torchrun could not place them
    record = scaling.measure(cfg, cfg.to_dict(), "unused", 16, 2, 1000.0)
    assert record["measured"] is False and record["efficiency"] == 1.0 and record["samples_per_s"] == 2000.0
    assert record["note"] == ("not measured here (train.nproc: 2 processes need one GPU each; 0 visible here); "
                              "linear scaling assumed")
    assert scaling.reasoning(record).startswith("scaling to 2 ranks not measured here (train.nproc")
