"""study.json's content from a study's rows: per batch size, the LR its search chose
(components/lr_search.py) and the aggregates over that LR's seeds; the fit of the critical
batch over those runs; the fastest batch; and the plain-language answer, which names what the
numbers rest on (diverged runs and their retries, unbracketed LRs, seeds that missed)."""

import math
import statistics
import time
from typing import Dict, List, Optional

from components import critical_batch, lr_search
from components.config import parse_config
from components.errors import DataError

_MEASURES = ("steps_to_target", "samples_to_target", "epochs_to_target", "time_to_target_s")


def resolved(config: dict, rows: List[Dict]) -> dict:
    """The study's config with eval.monitor and eval.mode as its runs used them: for a user's
    file they are known only once the data is (components.config.for_dataset)."""
    ev = config.get("eval") or {}
    first = next((r for r in rows if r.get("monitor")), None)
    if first is None or (ev.get("monitor") and ev.get("mode")):
        return config
    return {**config, "eval": {**ev, "monitor": ev.get("monitor") or first["monitor"],
                               "mode": ev.get("mode") or first["mode"]}}


def _spread(values: List[float]) -> Optional[Dict]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _batch(batch: int, rows: List[Dict], decision: lr_search.Decision) -> Dict:
    runs = [r for r in rows if r["selected"]]
    tests = [r["test_metric"] for r in runs if r.get("test_metric") is not None]
    lrs = [r["lr"] for r in runs if r.get("lr") is not None]
    resolutions = [lr_search.resolution(r.get("eval_every_steps"), r["steps_to_target"])
                   for r in runs if r["reached_target"]]
    return {
        "batch_size": batch, "lr": lrs[0] if lrs else None, "lr_multiplier": decision.chosen, "seeds": len(runs),
        "reached": sum(bool(r["reached_target"]) for r in runs),
        **{m: _spread([r.get(m) for r in runs]) for m in _MEASURES},
        "test_metric": {"mean": statistics.fmean(tests),
                        "std": statistics.stdev(tests) if len(tests) > 1 else None} if tests else None,
        "regime": None, "lr_search": {**decision.to_dict(), "centre": rows[0].get("lr_centre", 1.0)},
        "missed": [r["name"] for r in runs if not r["reached_target"]],
        # worst relative overestimate of its steps to target, from the evaluation cadence
        "step_resolution": max((x for x in resolutions if x is not None), default=None),
    }


def overhead_of(probe: Optional[Dict]) -> float:
    """The trainer's own cost per step that the probe measured (components/loop_pace.py), from its
    decision (components/probe.py decision) or probe.json's "throughput"; 0 when not measured."""
    loop = (probe or {}).get("loop") or {}
    return loop.get("overhead_s") or 0.0


def probe_seconds_per_step(ladder: List[Dict], batch: int, micro: int, train_cfg, overhead_s: float = 0.0) -> float:
    """Seconds per optimizer step at `batch` = `micro` x accumulation, from the probe's warmed-up
    throughput ladder, for the loop as it runs: the trainer's own cost per step the probe measured
    (`overhead_s`, components/loop_pace.py) on top, and with one micro-batch per step, every
    train.noise_scale_every_steps-th step is split into two halves to measure the noise scale
    (components/training.py), which costs what the ladder says the half micro-batch costs."""
    from components.accumulation import NOISE_EVERY_SPLIT, measuring_micro  # torch: not at import (submit reads this module)
    from components.probe import throughput_at

    plain = batch / throughput_at(ladder, micro) + overhead_s
    if not train_cfg.track_noise_scale or micro < batch:
        return plain  # with accumulation the measuring step is an ordinary one
    split = measuring_micro(batch, micro)
    if not split or split >= micro:
        return plain
    every = train_cfg.noise_scale_every_steps or NOISE_EVERY_SPLIT
    return plain + (batch / throughput_at(ladder, split) + overhead_s - plain) / every


def summarize(config: dict, rows: List[Dict], probe: Optional[dict] = None) -> Dict:
    """study.json's content from the runs' rows: per-batch aggregates, the fit, the answer."""
    cfg = parse_config(resolved(config, rows))
    rules = lr_search.Rules.of(cfg)
    batches = []
    for batch in sorted({r["batch_size"] for r in rows}):
        mine = [r for r in rows if r["batch_size"] == batch]
        decision = lr_search.decide(mine, lr_search.Rules.of(cfg, mine[0].get("lr_centre", 1.0)))
        for r in mine:
            r["selected"] = (decision.chosen is not None and not r.get("superseded")
                             and lr_search.canonical(r["lr_multiplier"]) == decision.chosen)
        batches.append(_batch(batch, mine, decision))

    # diverged, failed and superseded runs are never selected, so never fitted
    points = [(r["batch_size"], r["steps_to_target"]) for r in rows if r["selected"] and r["reached_target"]]
    try:
        fitted = critical_batch.fit_critical_batch([b for b, _ in points], [s for _, s in points])
        fit = {**fitted.to_dict(), "error": None}
        for b in batches:
            b["regime"] = critical_batch.regime(b["batch_size"], fitted.b_crit)
    except DataError as exc:
        fitted, fit = None, {"error": str(exc)}

    # Fastest batch: steps from the fit (which pools every batch, so one unlucky seed does not
    # decide) x seconds per step from the probe's throughput ladder (timed after a warm-up),
    # else the runs' own warm pace. Without a fit, the measured times decide.
    ladder = (probe or {}).get("throughput_ladder")
    for b in batches:
        done = [r for r in rows if r["batch_size"] == b["batch_size"] and r["selected"] and r.get("optimizer_steps")]
        paces = [r.get("seconds_per_step") or r["train_time_s"] / r["optimizer_steps"] for r in done]
        b["seconds_per_step"] = statistics.median(paces) if paces else None
        if ladder and done:
            b["probe_seconds_per_step"] = probe_seconds_per_step(ladder, b["batch_size"], done[0]["micro_batch_size"],
                                                                 cfg.train, overhead_of(probe))
        pace = b.get("probe_seconds_per_step") or b["seconds_per_step"]
        b["predicted_time_s"] = fitted.steps_at(b["batch_size"]) * pace if fitted is not None and pace else None
    reached = [b for b in batches if b["reached"]]
    by_fit = fitted is not None and all(b["predicted_time_s"] is not None for b in reached)
    best = {
        "time": min(({"batch_size": b["batch_size"], "time_to_target_s": b["time_to_target_s"]["median"],
                      "predicted_time_s": b["predicted_time_s"],
                      "by": ("fitted steps x the probe's throughput" if ladder else "fitted steps x the runs' pace")
                      if by_fit else "measured time"} for b in reached),
                    key=lambda x: x["predicted_time_s"] if by_fit else x["time_to_target_s"], default=None),
        "samples": min(({"batch_size": b["batch_size"], "samples_to_target": b["samples_to_target"]["median"]}
                        for b in reached), key=lambda x: x["samples_to_target"], default=None),
    }
    completed = [r for r in rows if r.get("status") == lr_search.COMPLETED]
    study = {
        "study_id": cfg.run_id, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "target": {"metric": cfg.eval.monitor, "value": cfg.eval.target, "mode": cfg.eval.mode,
                   "stop_at_target": cfg.eval.stop_at_target},
        "model": cfg.model.factory or cfg.model.name, "data": cfg.data.path or cfg.data.name,
        "data_version": completed[0]["data_version"] if completed else None,
        "device": probe.get("device") if probe else None,
        "budget": {"max_epochs": cfg.study.max_epochs, "max_steps": cfg.study.max_steps},
        "lr_rule": {"lr": cfg.train.lr, "base_batch_size": cfg.train.base_batch_size,
                    "lr_scaling": cfg.train.lr_scaling, "lr_grid": cfg.study.lr_grid},
        "lr_search": {"grid": list(rules.grid), "searching": rules.searching, "max_extensions": rules.extensions,
                      "max_retries": rules.retries, "step_cap": rules.cap},
        "cadence": {"evals_to_target": rules.evals_to_target, "step_precision": rules.precision},
        "compute": {"runs": len(rows), "samples": sum(r.get("samples_seen") or 0 for r in rows),
                    "train_time_s": sum(r.get("train_time_s") or 0.0 for r in rows)},
        "wandb_group": cfg.tracking.group or cfg.run_id,
        "runs": rows, "batches": batches, "fit": fit,
        "probe": None if probe is None else {
            "b_simple": probe["b_simple"], "b_simple_spread": probe.get("b_simple_spread"),
            "recommended_batch": probe["recommendation"]["effective_batch_size"],
            "max_micro_batch_size": probe["max_micro_batch_size"]},
        "best": best,
    }
    study["answer"] = answer(study, fitted)
    return study


def _fmt(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def _x(multipliers) -> str:
    return ", ".join(f"x{m:g}" for m in multipliers)


def answer(study: Dict, fitted) -> List[str]:
    """The plain-language conclusion at the top of the report, from the numbers alone."""
    t, batches, lines = study["target"], study["batches"], []
    goal = f"{t['metric']} {t['value']:g}"
    if study["best"]["time"]:
        fastest = study["best"]["time"]
        bt = next(b for b in batches if b["batch_size"] == fastest["batch_size"])
        measured = (f"{_fmt(bt['steps_to_target']['median'])} steps, {bt['epochs_to_target']['median']:.2g} epochs, "
                    f"{bt['time_to_target_s']['median']:.3g} s of training")
        if fastest["predicted_time_s"] is not None:
            lines.append(f"Batch {bt['batch_size']} reaches {goal} fastest: ~{fastest['predicted_time_s']:.2g} s of "
                         f"training by {fastest['by']}; measured in this study: {measured}.")
        else:
            lines.append(f"Batch {bt['batch_size']} reaches {goal} fastest: {measured}.")
        bs = next(b for b in batches if b["batch_size"] == study["best"]["samples"]["batch_size"])
        lines.append(f"Batch {bs['batch_size']} needs the fewest samples: {_fmt(bs['samples_to_target']['median'])} "
                     f"({bs['epochs_to_target']['median']:.2g} epochs).")
    else:
        lines.append(f"No batch size reached {goal} within the budget; lower eval.target or raise study.max_epochs.")
    if fitted is not None:
        saves = critical_batch.doubling_saves(fitted.b_crit, fitted.b_crit)
        costs = critical_batch.doubling_costs(fitted.b_crit, fitted.b_crit)
        lines.append(f"Critical batch B_crit ~ {_fmt(fitted.b_crit)} (+- {_fmt(fitted.b_crit_err)}). No batch gets "
                     f"there in fewer than ~{_fmt(fitted.s_min)} steps, nor with fewer than ~{_fmt(fitted.e_min)} "
                     f"samples. Above B_crit, doubling the batch saves fewer than {saves:.0%} of the steps and costs "
                     f"over {costs:.0%} more samples.")
        regimes = {}
        for b in batches:
            if b["regime"]:
                regimes.setdefault(b["regime"], []).append(str(b["batch_size"]))
        lines.append("Regimes: " + "; ".join(f"{k}: {', '.join(v)}" for k, v in regimes.items()) + ".")
    else:
        lines.append(f"No fit of the critical batch: {study['fit']['error']}.")
    if study["probe"] and study["probe"]["b_simple"] is not None:
        lines.append(f"The probe's gradient noise scale B_simple ~ {_fmt(study['probe']['b_simple'])} "
                     f"(early in training; it grows as the loss falls) recommended batch "
                     f"{study['probe']['recommended_batch']}.")
    lines += search_lines(study)
    lines.append(generalization_check(study))
    return lines


def search_lines(study: Dict) -> List[str]:
    """What the per-batch results rest on: the LR each batch was judged at, divergences and
    their retries, LRs not bracketed, seeds that missed, batches with no result."""
    batches, search, rule = study["batches"], study["lr_search"], study["lr_rule"]
    goal = f"{study['target']['metric']} {study['target']['value']:g}"
    rule_text = f"the {rule['lr_scaling']} rule's LR ({rule['lr']:g} at batch {rule['base_batch_size']})"
    chosen = [b for b in batches if b["lr_multiplier"] is not None]
    lines = []
    if search["searching"]:
        centred = [b for b in batches if b["lr_search"].get("centre", 1.0) != 1.0]
        where = (" around the LR the probe's noise scale predicts (" + ", ".join(
            f"x{b['lr_search']['centre']:g} at {b['batch_size']}" for b in centred) + ")") if centred else ""
        lines.append(f"LR searched per batch over {_x(search['grid'])} of {rule_text}{where}, chosen by the fewest "
                     "steps to the target (median over seeds): " + ", ".join(
                         f"{b['batch_size']}: x{b['lr_multiplier']:g}" for b in chosen) + ".")
        extended = [f"{b['batch_size']} ({_x(b['lr_search']['extensions'])})" for b in batches
                    if b["lr_search"]["extensions"]]
        if extended:
            lines.append("Grid extended past its edge for batch " + "; ".join(extended) + ".")
        loose = [b for b in chosen if b["lr_search"]["bracketed"] is False]
        if loose:
            lines.append(f"Not bracketed (after at most {search['max_extensions']} extensions the best LR is still "
                         "the edge of those tried, so a better one may lie beyond and these steps be "
                         "overestimated): " + "; ".join(
                             f"batch {b['batch_size']} (x{b['lr_multiplier']:g}, the {b['lr_search']['edge']} tried)"
                             for b in loose) + ".")
    else:
        lines.append(f"One LR per batch (study.lr_grid=null): {rule_text}, not re-tuned.")
    diverged = [(b, name) for b in batches for name in b["lr_search"]["diverged"]]
    if diverged:
        runs = {r["name"]: r for r in study["runs"]}

        def why(name: str) -> str:
            d, r = runs[name].get("divergence") or {}, runs[name]
            step = f" at step {d['step']}" if d.get("step") is not None else ""
            return f"{name} ({d.get('rule') or 'diverged'}{step}, lr {r['lr']:.3g})" if r.get("lr") else name

        lines.append("Diverged, labelled and left out of the fit: " + ", ".join(why(n) for _, n in diverged) + ".")
        for b in batches:
            s = b["lr_search"]
            if s["retries"]:
                lines.append(f"Batch {b['batch_size']}: every LR tried diverged, so it was retried at half the LR "
                             f"(at most {search['max_retries']} times): {_x(s['retries'])}"
                             + (f"; judged at x{b['lr_multiplier']:g}." if b["lr_multiplier"] else
                                "; it diverged at all of them."))
    for b in batches:
        if b["lr_multiplier"] is None:
            why = "diverged" if b["lr_search"]["diverged"] else "failed"
            lines.append(f"Batch {b['batch_size']} {why} at every LR tried ({_x(b['lr_search']['tried'])}): "
                         "no result, not in the fit.")
    fitted = {b["batch_size"] for b in batches if b["reached"]} if study["fit"].get("error") is None else set()
    missed = [f"batch {b['batch_size']} ({', '.join(b['missed'])})" for b in batches
              if b["missed"] and b["batch_size"] in fitted]
    if missed:
        lines.append(f"Seeds that missed {goal} at their batch's chosen LR (the batch is fitted from its other "
                     "seeds): " + "; ".join(missed) + ".")
    unreached = [str(b["batch_size"]) for b in chosen if not b["reached"]]
    if unreached:
        lines.append(f"Batch {', '.join(unreached)} did not reach {goal} within the budget.")
    res = [b["step_resolution"] for b in batches if b.get("step_resolution") is not None]
    if res:
        lines.append("Steps to target are exact (the runs that count were evaluated at every step)." if max(res) == 0
                     else f"Steps to target are measured to within {max(res):.1%} (evaluation cadence, worst batch).")
    return lines


def generalization_check(study: Dict) -> str:
    """The folklore "large batches generalize worse", checked against the test metric."""
    # Runs that stop at the target are models of equal validation quality, so this asks whether
    # test quality differs at equal validation quality; with eval.stop_at_target=false the runs
    # train on (patience, budget) and this compares fully trained models.
    scored = [b for b in study["batches"] if b["test_metric"] and b["reached"]]
    if len(scored) < 2:
        return "Too few batch sizes reached the target to compare generalization."
    largest = max(scored, key=lambda b: b["batch_size"])
    mode = study["target"]["mode"]
    best = (max if mode == "max" else min)(scored, key=lambda b: b["test_metric"]["mean"])
    name = "test/" + study["target"]["metric"].split("/", 1)[1]
    gap = largest["test_metric"]["mean"] - best["test_metric"]["mean"]
    stds = [b["test_metric"]["std"] for b in scored if b["test_metric"]["std"] is not None]
    retuned = "with the LR re-tuned per batch" if study["lr_search"]["searching"] else \
        "with the LR scaled by rule, not re-tuned (set study.lr_grid to re-tune)"
    when = ("at the target (eval.stop_at_target=false compares fully trained models)"
            if study["target"].get("stop_at_target", True) else "after training on past the target")
    head = f"Generalization {when}: largest batch {largest['batch_size']} has {name} " \
           f"{largest['test_metric']['mean']:.4g} vs best {best['test_metric']['mean']:.4g} at batch " \
           f"{best['batch_size']} ({gap:+.3g}), {retuned}"
    if not stds:
        return head + "; one seed per batch, so the seed-to-seed spread is unknown (study.seeds=3 to tell)."
    noise = max(stds)
    verdict = "within" if abs(gap) <= 2 * noise else "beyond"
    return head + f"; {verdict} twice the seed-to-seed spread ({noise:.2g})."
