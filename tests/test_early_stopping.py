"""Early stopping on scripted metric sequences: no training needed to check each rule."""

import math

import pytest

from components import early_stopping as es


def feed(stopper, values):
    """Feed values at steps 1, 2, ...; return the step at which it asked to stop (or None)."""
    for step, value in enumerate(values, start=1):
        stopper.update(value, step)
        if stopper.should_stop:
            return step
    return None


def test_patience_counts_evaluations_without_improvement():
    s = es.EarlyStopping(mode="max", patience=3)
    assert feed(s, [0.5, 0.6, 0.6, 0.59, 0.58, 0.9]) == 5
    assert s.stop_reason == es.PATIENCE
    assert (s.best, s.best_step) == (0.6, 2)


def test_an_improvement_resets_patience():
    s = es.EarlyStopping(mode="min", patience=2)
    assert feed(s, [1.0, 1.1, 0.9, 1.0, 0.8, 0.85, 0.85]) == 7
    assert (s.best, s.best_step) == (0.8, 5)


def test_min_delta_improvements_too_small_do_not_reset_patience_but_keep_best_weights():
    s = es.EarlyStopping(mode="max", patience=2, min_delta=0.05)
    assert feed(s, [0.50, 0.52, 0.54]) == 3  # +0.02, +0.04 relative to 0.50: not significant
    assert (s.best, s.best_step) == (0.54, 3)  # but the best weights are still the best ones
    s = es.EarlyStopping(mode="max", patience=2, min_delta=0.05)
    assert feed(s, [0.50, 0.52, 0.56, 0.57]) is None  # 0.56 beats 0.50 by more than 0.05
    assert s.bad_evals == 1


def test_target_stops_at_the_first_evaluation_reaching_it():
    s = es.EarlyStopping(mode="max", patience=10, target=0.9)
    assert feed(s, [0.5, 0.89, 0.9, 0.95]) == 3
    assert s.stop_reason == es.TARGET_REACHED and s.target_step == 3
    s = es.EarlyStopping(mode="min", patience=10, target=0.1)
    assert feed(s, [0.5, 0.2, 0.09]) == 3 and s.target_step == 3


def test_the_target_can_be_recorded_without_stopping():
    s = es.EarlyStopping(mode="max", patience=2, target=0.9, stop_at_target=False)
    assert feed(s, [0.5, 0.91, 0.95, 0.94, 0.93]) == 5  # patience, not the target, stops it
    assert s.stop_reason == es.PATIENCE and s.target_step == 2 and (s.best, s.best_step) == (0.95, 3)


def test_divergence_threshold_stops_when_worse_than_the_threshold():
    s = es.EarlyStopping(mode="min", patience=10, divergence_threshold=5.0)
    assert feed(s, [2.0, 1.5, 4.9, 5.1]) == 4
    assert s.stop_reason == es.DIVERGED and s.best == 1.5
    s = es.EarlyStopping(mode="max", patience=10, divergence_threshold=0.2)
    assert feed(s, [0.5, 0.3, 0.19]) == 3 and s.stop_reason == es.DIVERGED


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_metric_stops_at_once_and_keeps_the_best(bad):
    s = es.EarlyStopping(mode="min", patience=10)
    assert feed(s, [1.0, 0.5, bad, 0.1]) == 3
    assert s.stop_reason == es.NON_FINITE and (s.best, s.best_step) == (0.5, 2)


def test_state_round_trips_for_resume():
    s = es.EarlyStopping(mode="max", patience=3, target=0.99)
    feed(s, [0.5, 0.7, 0.6])
    t = es.EarlyStopping(mode="max", patience=3, target=0.99)
    t.load_state_dict(s.state_dict())
    assert feed(t, [0.6, 0.6]) is not None and t.stop_reason == es.PATIENCE  # 2 more bad evals -> 3
