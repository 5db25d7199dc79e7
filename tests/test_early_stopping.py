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
    assert feed(s, [2.0, 1.95, 4.9, 5.1]) == 4
    assert s.stop_reason == es.DIVERGED and s.best == 1.95 and s.divergence_rule == es.RULE_THRESHOLD
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


def test_a_metric_that_falls_back_to_its_start_after_improving_is_a_collapse():
    """Seen in a study: val/accuracy 0.10 -> 0.94 -> back to chance, and trained on."""
    s = es.EarlyStopping(mode="max", patience=100)
    assert feed(s, [0.10, 0.60, 0.94, 0.105, 0.10]) == 5  # two evaluations in a row at the start's level
    assert (s.stop_reason, s.divergence_rule, s.best, s.best_step) == (es.DIVERGED, es.RULE_COLLAPSE, 0.94, 3)
    assert s.divergence_detail == "metric fell back to 0.1 at step 5 after reaching 0.94 at step 3 " \
                                  "(it started at 0.1)"
    s = es.EarlyStopping(mode="min", patience=100)  # a loss: lower is better
    assert feed(s, [2.3, 0.5, 0.2, 2.1, 2.2]) == 5 and s.divergence_rule == es.RULE_COLLAPSE


@pytest.mark.parametrize("values", [
    [0.10, 0.60, 0.94, 0.10, 0.90, 0.10],  # a single dip, recovered: noise, not a collapse
    [0.10, 0.103, 0.10, 0.10],  # never clearly improved (gain under 5% of the start)
    [0.10, 0.60, 0.94, 0.25, 0.24],  # lost most of the gain but not back to the start
])
def test_what_is_not_a_collapse(values):
    s = es.EarlyStopping(mode="max", patience=100)
    assert feed(s, values) is None and not s.diverged


def test_a_train_loss_that_explodes_is_a_divergence_even_at_chance_accuracy():
    s = es.EarlyStopping(mode="max", patience=100)
    s.update(0.1, 10)
    s.train_loss(mean_loss=22.9, first_loss=2.3, step=20)
    assert not s.diverged  # under 10x the first step's loss
    s.train_loss(mean_loss=1e7, first_loss=2.3, step=30)
    assert (s.stop_reason, s.divergence_rule) == (es.DIVERGED, es.RULE_LOSS_EXPLODED)
    assert s.divergence_detail == "train loss 1e+07 before step 30 is over 10x the first step's 2.3"


def test_a_collapse_is_measured_from_the_untrained_score():
    """The first evaluation comes an epoch in: a noisy dip below it is not a collapse when the
    untrained model scored far lower (seen: val/r2 0.50 -> 0.21 -> 0.41 on a 66-row split)."""
    values = [0.495, 0.21, 0.406, 0.543, 0.503, 0.45, 0.467]
    s = es.EarlyStopping(mode="max", patience=100)
    assert feed(s, values) == 7 and s.divergence_rule == es.RULE_COLLAPSE  # measured from 0.495: 0.45, 0.467
    s = es.EarlyStopping(mode="max", patience=100)
    s.start(0.002)  # the untrained model
    assert feed(s, values) is None and not s.diverged
    assert feed(s, [0.05, 0.04]) == 2 and s.divergence_rule == es.RULE_COLLAPSE  # back at the start
