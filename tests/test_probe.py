"""The probe step: recommendation arithmetic, bad input, and a real probe of digits on CPU."""

import json

import pytest

from components import data_prep, probe
from components.config import parse_config
from components.errors import ConfigError
from conftest import config


def ladder(rates):
    return [{"micro_batch_size": b, "samples_per_s": r} for b, r in rates.items()]


def auto(**train):
    return config(train={"batch_size": "auto", "micro_batch_size": "auto", **train})


def test_throughput_is_interpolated_in_log_batch():
    rungs = ladder({8: 100.0, 16: 200.0, 32: 300.0})
    assert probe.throughput_at(rungs, 16) == 200.0
    assert probe.throughput_at(rungs, 4) == pytest.approx(50.0)  # below the ladder: proportional
    assert probe.throughput_at(rungs, 64) == 300.0  # above: flat
    assert probe.throughput_at(rungs, 24) == pytest.approx(200 + 100 * 0.5849625, rel=1e-6)  # log2(24/16)


def test_goodput_picks_where_throughput_stops_paying_for_lost_efficiency():
    # throughput grows linearly up to micro-batch 256, then is flat; B_noise = 100
    rates = {b: 10.0 * b for b in (8, 16, 32, 64, 128, 256)} | {512: 2560.0}
    choice = probe.recommend(auto(lr=0.1, base_batch_size=32, lr_scaling="linear"), fit=512,
                             ladder=ladder(rates), b_noise=100.0, n_train=8192)
    # goodput(B) = 10 B / (1 + B/100) grows until 256 and then falls (flat throughput)
    assert choice["effective_batch_size"] == 256
    assert (choice["micro_batch_size"], choice["accumulation_steps"], choice["world_size"]) == (256, 1, 1)
    assert choice["lr"] == pytest.approx(0.8)
    by_batch = {o["effective_batch_size"]: o for o in choice["options"]}
    assert by_batch[128]["goodput"] == pytest.approx(1280 / (1 + 1.28))
    assert by_batch[512]["statistical_efficiency"] == pytest.approx(1 / 6.12)


def test_past_the_memory_fit_a_bigger_batch_only_costs_efficiency():
    rates = {8: 80.0, 16: 160.0, 32: 320.0, 64: 640.0}
    choice = probe.recommend(auto(), fit=64, ladder=ladder(rates), b_noise=1e9, n_train=8192)
    assert choice["effective_batch_size"] == 64  # throughput is flat beyond the fit: ties go to the smaller
    fixed = config(train={"batch_size": 1024, "micro_batch_size": "auto", "lr": 0.1, "base_batch_size": 32,
                          "lr_scaling": "sqrt"})
    choice = probe.recommend(fixed, fit=64, ladder=ladder(rates), b_noise=1e9, n_train=8192)
    assert (choice["effective_batch_size"], choice["micro_batch_size"], choice["accumulation_steps"]) == (1024, 64, 16)
    assert choice["lr"] == pytest.approx(0.1 * (1024 / 32) ** 0.5)


def test_a_faster_smaller_micro_batch_is_preferred_with_accumulation():
    rates = {8: 80.0, 16: 400.0, 32: 200.0}  # e.g. a cache cliff above 16
    choice = probe.recommend(config(train={"batch_size": 64, "micro_batch_size": "auto"}), 32, ladder(rates),
                             50.0, 4096)
    assert (choice["micro_batch_size"], choice["accumulation_steps"]) == (16, 4)


def test_fixed_sizes_are_respected():
    rates = {8: 80.0, 16: 160.0, 32: 320.0}
    both = probe.recommend(config(train={"batch_size": 96, "micro_batch_size": 16}), 32, ladder(rates), 50.0, 4096)
    assert (both["effective_batch_size"], both["micro_batch_size"], both["accumulation_steps"]) == (96, 16, 6)
    only_batch = probe.recommend(config(train={"batch_size": 96, "micro_batch_size": "auto"}), 32, ladder(rates),
                                 50.0, 4096)
    assert (only_batch["effective_batch_size"], only_batch["micro_batch_size"]) == (96, 32)
    only_micro = probe.recommend(config(train={"batch_size": "auto", "micro_batch_size": 16}), 32, ladder(rates),
                                 1e9, 4096)
    assert only_micro["micro_batch_size"] == 16 and only_micro["effective_batch_size"] % 16 == 0


@pytest.fixture
def digits_artifact(tmp_path):
    raw = auto().to_dict()
    raw["probe"].update(warmup_steps=20, throughput_steps=2, noise_batches=8)
    raw["run_id"] = "p"
    data_prep.run(raw, str(tmp_path / "data"))
    return raw, tmp_path


def test_probe_on_digits_writes_its_measurements_and_choice(digits_artifact, capsys):
    raw, tmp = digits_artifact
    result = probe.run(raw, str(tmp / "data"), str(tmp / "out.json"), str(tmp / "run"))
    saved = json.loads((tmp / "run" / "probe.json").read_text())
    assert saved == json.loads((tmp / "out.json").read_text()) == json.loads(json.dumps(result))
    memory = result["memory"]
    assert len(memory["trials"]) <= 4 and memory["micro_batch_size"] == 1259  # capped by the train split
    assert memory["per_sample_bytes"] > 0 and "CPU" in memory["budget"]
    rungs = [r["micro_batch_size"] for r in result["throughput"]["ladder"]]
    assert rungs == [8, 16, 32, 64, 128, 256, 512, 1024, 1259]
    assert result["noise_scale"]["b_simple"] > 0 and result["noise_scale"]["n_batches"] == 8
    choice = result["recommendation"]
    assert choice["effective_batch_size"] == choice["micro_batch_size"] * choice["accumulation_steps"]
    assert 8 <= choice["effective_batch_size"] <= 1259 // 8
    assert choice["lr"] == pytest.approx(0.05 * choice["effective_batch_size"] / 32)
    assert result["reasoning"][0].startswith("largest fitting micro-batch 1259")
    assert result["reasoning"][-1].startswith(f"-> effective {choice['effective_batch_size']} = ")

    # a resumed run keeps the decision its checkpoints were made with
    capsys.readouterr()
    again = probe.run(raw, str(tmp / "data"), str(tmp / "again.json"), str(tmp / "run"))
    assert again == saved and "reusing" in capsys.readouterr().out
    applied = parse_config(probe.apply(raw, result))
    assert applied.accumulation_steps == choice["accumulation_steps"]


def test_probe_refuses_what_cannot_fit(digits_artifact):
    raw, tmp = digits_artifact
    tiny = {**raw, "probe": {**raw["probe"], "memory_budget_gb": 1e-6}}
    with pytest.raises(ConfigError) as err:
        probe.run(tiny, str(tmp / "data"), str(tmp / "out.json"), str(tmp / "run"))
    assert str(err.value).startswith("probe: ") and "\n" not in str(err.value)
    assert not (tmp / "run" / "probe.json").exists() and not (tmp / "out.json").exists()

    big_micro = {**raw, "train": {**raw["train"], "micro_batch_size": 4096, "batch_size": 8192}}
    with pytest.raises(ConfigError, match="train.micro_batch_size: 4096 does not fit"):
        probe.run({**big_micro, "probe": {**raw["probe"], "max_micro_batch_size": 8192, "memory_budget_gb": 0.002}},
                  str(tmp / "data"), str(tmp / "out.json"), str(tmp / "run"))
