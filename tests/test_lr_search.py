"""The LR search of a study (components/lr_search.py), with scripted runs: the grid and its
centre, extensions past an edge, confirmation seeds, the step cap, the evaluation cadence and
its remeasures, and divergence (labelled, never chosen, retried at half the LR)."""

import pytest

from components import lr_search, study
from components.config import parse_config
from study_helpers import PROBE, row, scripted, search, study_config


def test_each_batchs_lr_grid_is_centred_where_the_noise_scale_puts_its_best_lr():
    # B_simple 150, linear rule from 0.05 at 32: the best LR saturates above ~150, the rule does not;
    # at 512 the prediction is (1 + 150/32) / (1 + 150/512) = 4.4x the LR at 32, the rule's 16x: x0.275 -> x0.25
    entries = study.plan(study_config(), 1259, PROBE)
    assert [(e["batch_size"], e["lr_centre"]) for e in entries] == [
        (8, 1.0), (16, 1.0), (32, 1.0), (64, 1.0), (128, 0.5), (256, 0.5), (512, 0.25)]
    assert lr_search.lr_centre(2048, 150.0, 32, "linear") == 0.0625  # 0.083
    assert lr_search.lr_centre(2048, 150.0, 32, "none") == 4.0  # (1 + 150/32) / (1 + 150/2048) = 5.3
    assert lr_search.lr_centre(512, None, 32, "linear") == 1.0
    assert {e["lr_centre"] for e in study.plan(study_config(lr_centre="rule"), 1259, PROBE)} == {1.0}
    adamw = study_config()
    adamw["train"]["optimizer"] = "adamw"  # the prediction is SGD's
    assert {e["lr_centre"] for e in study.plan(adamw, 1259, PROBE)} == {1.0}
    # the search at 512 starts in the middle of its centred grid x0.125, x0.25, x0.5
    runner, calls = scripted(lambda m, s: round(20 * max(0.25 / m, m / 0.25)))
    rows = study.run_batch(entries[-1], "unused", "unused", runner=runner)
    assert [m for m, *_ in calls] == [0.25, 0.5, 0.125, 0.25, 0.25]  # then two more seeds at the chosen x0.25
    assert study.summarize(study_config(), rows, PROBE)["batches"][0]["lr_search"]["centre"] == 0.25


def test_the_grid_is_extended_past_its_edge_at_most_three_times():
    # fastest at x8: the grid x0.5-x2 picks its highest edge, x4 and x8 follow, x16 brackets x8
    rows, calls, config = search(lambda m, s: round(40 * max(8 / m, m / 8)))
    assert [(m, kind) for m, _, kind, _, _ in calls] == [
        (1.0, "grid"), (2.0, "grid"), (0.5, "grid"), (4.0, "extension"), (8.0, "extension"), (16.0, "extension")]
    result = study.summarize(config, rows, None)
    (batch,) = result["batches"]
    assert batch["lr_multiplier"] == 8.0 and batch["lr_search"]["bracketed"] is True
    assert batch["lr_search"]["extensions"] == [4.0, 8.0, 16.0]
    assert [r["name"] for r in rows if r["selected"]] == ["b64-lr8x-s0"]
    # still improving at x16 after three extensions: not bracketed, and the answer says so
    rows, calls, config = search(lambda m, s: round(320 / m))
    assert [m for m, *_ in calls] == [1.0, 2.0, 0.5, 4.0, 8.0, 16.0]
    text = "\n".join(study.summarize(config, rows, None)["answer"])
    assert "Not bracketed (after at most 3 extensions" in text and "batch 64 (x16, the highest tried)" in text
    assert "Grid extended past its edge for batch 64 (x4, x8, x16)." in text
    # best at the lowest edge: the grid goes down, by its own step at that edge
    rows, calls, _ = search(lambda m, s: round(20 * max(0.1 / m, m / 0.1)), lr_grid=[0.3, 1, 3])
    assert [m for m, *_ in calls] == [1.0, 3.0, 0.3, 0.09, 0.027]


def test_the_chosen_lr_is_confirmed_on_another_seed_and_chosen_again_on_medians():
    # seen on the held-out task at batch 16: x2 is the fastest on seed 0 by luck (edge of stability)
    steps = {(1.0, 0): 76, (1.0, 1): 88, (2.0, 0): 50, (2.0, 1): 204, (0.5, 0): None, (4.0, 0): None}
    rows, calls, config = search(lambda m, s: steps[m, s], confirm_seeds=1)
    assert [(m, seed, kind) for m, seed, kind, _, _ in calls] == [
        (1.0, 0, "grid"), (2.0, 0, "grid"), (0.5, 0, "grid"), (4.0, 0, "extension"),  # x2 at the edge
        (2.0, 1, "confirm"),  # x2: median of 50 and 204 is 127, so x1 (76) is chosen...
        (0.5, 0, "longer"), (4.0, 0, "longer"),  # ...and runs capped at 1.25 x 50 = 63 < 76 could beat it...
        (1.0, 1, "confirm")]  # ...they do not (capped at 95 now); x1 is confirmed: median 82
    assert [cap for m, _, kind, _, cap in calls if kind == "longer"] == [95, 95]
    (batch,) = study.summarize(config, rows, None)["batches"]
    assert batch["lr_multiplier"] == 1.0 and batch["seeds"] == 2 and batch["steps_to_target"]["median"] == 82
    assert [r["name"] for r in rows if r["selected"]] == ["b64-lr1x-s0", "b64-lr1x-s1"]


def test_search_runs_are_capped_and_evaluated_to_match_their_expected_steps():
    rows, calls, _ = search(lambda m, s: {1.0: 300, 2.0: 150, 0.5: 600, 4.0: None}[m])
    # (multiplier, every, cap): the first run evaluates every round(one epoch of 19 steps / 40) = 1 step...
    assert [(m, every, cap) for m, _, _, every, cap in calls] == [
        (1.0, 1, None),  # ...then every round(half the fewest steps so far / 40), capped at 1.25x them
        (2.0, 4, 375), (0.5, 2, 190), (4.0, 2, 190)]
    assert [r["capped"] for r in rows if not r["reached_target"]] == [True, True]
    assert lr_search.eval_every([], lr_search.Rules.of(parse_config(study_config())), 157, 4710) == 4


def test_a_coarsely_measured_run_is_repeated_with_finer_evaluations():
    rules = lr_search.Rules.of(parse_config(study_config(lr_grid=None)))
    coarse = {**row(64, 60), "eval_every_steps": 20, "search": "grid"}  # met somewhere in steps 41-60
    assert lr_search.resolution(20, 60) == pytest.approx(19 / 41)
    decision = lr_search.decide([coarse], rules)
    assert decision.next_runs == [(1.0, 0, "remeasure")]
    # finer: within the precision at 60 steps, and no coarser than 60 / evals_to_target
    assert lr_search.eval_every([coarse], rules, 19, 570, remeasure_of=coarse) == 2
    fine = {**row(64, 52), "eval_every_steps": 2, "search": "remeasure"}
    assert lr_search.decide([{**coarse, "superseded": True}, fine], rules).next_runs == [(1.0, 1, "confirm"),
                                                                                         (1.0, 2, "confirm")]
    # through run_batch: the first row is kept, superseded, and never selected
    rows, calls, config = search(lambda m, s: 31, lr_grid=None, evals_to_target=2)
    assert [(kind, every) for _, _, kind, every, _ in calls] == [("grid", 10), ("remeasure", 2)]
    result = study.summarize(config, rows, None)
    assert [(r["superseded"] if "superseded" in r else False, r["selected"]) for r in rows] == [(True, False),
                                                                                                 (False, True)]
    assert result["batches"][0]["steps_to_target"]["median"] == 32  # from 40 at every 10 steps
    assert result["batches"][0]["step_resolution"] == pytest.approx(1 / 31)


def test_a_diverged_run_is_labelled_left_out_and_retried_at_half_the_lr():
    # one LR per batch (lr_grid=null): x1 diverges, x0.5 diverges, x0.25 trains
    steps = {1.0: "diverged", 0.5: "diverged", 0.25: 120}
    rows, calls, config = search(lambda m, s: steps[m], lr_grid=None)
    assert [(m, kind) for m, _, kind, _, _ in calls] == [(1.0, "grid"), (0.5, "retry"), (0.25, "retry")]
    assert [r["status"] for r in rows] == ["diverged", "diverged", "completed"]
    result = study.summarize(config, rows, None)
    (batch,) = result["batches"]
    assert batch["lr_multiplier"] == 0.25 and batch["lr_search"]["retries"] == [0.25, 0.5]
    assert [r["selected"] for r in rows] == [False, False, True]
    text = "\n".join(result["answer"])
    assert "Diverged, labelled and left out of the fit: b64-lr1x-s0 (collapse at step 3, lr 0.1), " \
           "b64-lr0.5x-s0 (collapse at step 3, lr 0.05)." in text
    assert "Batch 64: every LR tried diverged, so it was retried at half the LR (at most 2 times): x0.25, x0.5; " \
           "judged at x0.25." in text
    # never more than twice: then the batch has no result, and says so
    rows, calls, config = search(lambda m, s: "diverged", lr_grid=None)
    assert [m for m, *_ in calls] == [1.0, 0.5, 0.25]
    result = study.summarize(config, rows, None)
    assert result["batches"][0]["lr_multiplier"] is None and result["batches"][0]["seeds"] == 0
    assert "Batch 64 diverged at every LR tried (x0.25, x0.5, x1): no result, not in the fit." in result["answer"]


def test_in_a_grid_a_diverged_lr_is_never_chosen_and_higher_ones_are_skipped():
    rows, calls, config = search(lambda m, s: "diverged" if m >= 1 else round(50 / m), seeds=2)
    # x1 diverges on seed 0: its seed 1 and x2 are not run; x0.5 is the lowest edge, so x0.25 follows
    # (slower: capped at 1.25 x 100 steps), which brackets x0.5
    assert [(m, seed) for m, seed, *_ in calls] == [(1.0, 0), (0.5, 0), (0.5, 1), (0.25, 0), (0.25, 1)]
    decision = lr_search.decide(rows, lr_search.Rules.of(parse_config(config)))
    assert decision.skipped == [2.0] and decision.diverged == ["b64-lr1x-s0"]
    assert decision.chosen == 0.5 and decision.bracketed is True
