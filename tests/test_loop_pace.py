"""The probe's measurement of the trainer's own cost per step (components/loop_pace.py): real
Trainer steps, timed step to step, beside the ladder's bare step."""

import time

import pytest

from components import loop_pace, study_summary, training
from components.config import Config, parse_config


def default_config() -> dict:
    raw = Config().to_dict()
    raw["data"]["name"] = "digits"
    return raw


def test_the_burst_times_the_trainers_loop_and_keeps_what_it_costs_beyond_the_bare_step(digits, monkeypatch):
    free = loop_pace.measure(default_config(), digits, 32, 0.0)
    assert free["steps"] == loop_pace.MAX_STEPS or free["steps"] >= loop_pace.MIN_STEPS
    assert free["overhead_s"] == free["seconds_per_step"] > 0  # a bare step of 0 s: all of it is the loop's
    slowest = loop_pace.MAX_STEP_S
    assert loop_pace.measure(default_config(), digits, 32, slowest)["overhead_s"] == 0.0  # never below zero
    assert loop_pace.measure(default_config(), digits, 32, slowest)["steps"] == loop_pace.MIN_STEPS
    skipped = loop_pace.measure(default_config(), digits, 32, 1.0)  # a 1 s step: the loop's cost is noise
    assert skipped["steps"] == 0 and skipped["overhead_s"] is None and skipped["note"].startswith("not measured")

    # a millisecond more of the loop's own work per optimizer step (its out-of-memory guard runs once a step)
    halving_on_oom = training.memory.halving_on_oom

    def slow_guard(*args):
        time.sleep(1e-3)
        return halving_on_oom(*args)

    monkeypatch.setattr(training.memory, "halving_on_oom", slow_guard)
    slow = loop_pace.measure(default_config(), digits, 32, free["seconds_per_step"])
    assert slow["overhead_s"] == pytest.approx(1e-3, abs=5e-4)


def test_a_burst_trains_in_one_process_without_noise_steps_evaluations_or_tracking(digits):
    raw = default_config()
    raw["train"].update(nproc=2)
    raw["eval"].update(target=0.5)
    raw["pipeline"] = "study"  # a study's probe: the burst is still one training run, with no target
    burst = loop_pace._burst_config(raw, 64, 40)
    assert burst["train"]["batch_size"] == burst["train"]["micro_batch_size"] == 64 and burst["train"]["nproc"] == 1
    assert burst["train"]["max_steps"] == 40 and burst["train"]["track_noise_scale"] is False
    assert burst["eval"]["every_steps"] == 40 and burst["eval"]["target"] is None
    assert burst["tracking"]["mode"] == "disabled" and burst["pipeline"] == "train"
    parse_config(burst)  # valid as it is
    assert raw["train"]["nproc"] == 2  # the run's own config is left alone
    assert study_summary.overhead_of({"loop": {"overhead_s": 2e-4}}) == 2e-4
    assert study_summary.overhead_of(None) == study_summary.overhead_of({"loop": {"overhead_s": None}}) == 0.0
