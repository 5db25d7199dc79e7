"""Step: the convergence study. Training runs that differ only in the effective batch size
(and the LR that goes with it), each until `eval.target` or its budget; then steps, samples,
epochs and time to target per batch, the fitted critical batch size, and the report.

Three parts, so the pipeline can fan the runs out (pipelines/graph.py):
  plan(config, n_train, probe)    -> one config per run
  run_one(run, dataset, study_dir) -> one row (trains and evaluates in one process)
  report(config, rows, study_dir)  -> study.json, report.html + PNGs, the W&B study run

    python -m components.study --config config.yaml --dataset dataset/ --study-dir runs/s1 [--probe probe.json]
runs all three in this process, one run after another.
"""

import argparse
import copy
import math
import os
import statistics
import time
from pathlib import Path
from typing import Dict, List, Optional

from components import critical_batch, storage
from components.config import largest_divisor_at_most, load_config_file, parse_config
from components.errors import DataError, UserInputError, exit_on_user_error

STUDY_FILE = "study.json"
RUNS_DIR = "runs"  # <study_dir>/runs/<run name>/: each run's own directory, as a training run has
NEVER = 10 ** 9  # patience of a study run that stops at the target: only the target or the budget stop it


# ---------------------------------------------------------------- plan

def batch_ladder(config: dict, n_train: int, probe: Optional[dict]) -> List[int]:
    """The batch sizes to compare: study.batch_sizes, or powers of two around the probe's
    recommendation, from probe.min_batch_size up to half the training split."""
    s = config["study"]
    if s["batch_sizes"]:
        return sorted(set(s["batch_sizes"]))
    if probe is None:
        raise UserInputError("study.batch_sizes: give the batch sizes to compare, or enable the probe "
                             "(probe.enabled=true) to build a ladder around its recommendation")
    centre = probe["recommendation"]["effective_batch_size"]
    low = max(config["probe"]["min_batch_size"], 1)
    high = max(low, n_train // 2)
    ladder = [2 ** k for k in range(0, 40) if low <= 2 ** k <= high]
    span = 2 ** s["ladder_doublings"]
    near = [b for b in ladder if centre / span <= b <= centre * span]
    return near or ladder[:1]


def run_name(batch: int, lr_multiplier: float, seed: int) -> str:
    return f"b{batch}-lr{lr_multiplier:g}x-s{seed}"


def plan(config: dict, n_train: int, probe: Optional[dict] = None) -> List[Dict]:
    """One entry per run: its name, what it varies, and its full config. The micro-batch is the
    largest that fits (the probe's memory fit, or train.micro_batch_size) and divides the batch."""
    cfg = parse_config(config)
    study_id = cfg.run_id
    if probe is not None:
        fits = probe["max_micro_batch_size"]
    elif isinstance(cfg.train.micro_batch_size, int):
        fits = cfg.train.micro_batch_size
    else:
        fits = None  # no probe, micro-batch "auto": the whole batch in one pass
    # eval.patience counts the pipeline's evaluations (once per epoch by default); study runs
    # evaluate evals_per_epoch times as often, so the same patience is that many more of them
    evals_per_eval = cfg.study.evals_per_epoch if cfg.eval.every_steps is None else 1
    runs = []
    for batch in batch_ladder(config, n_train, probe):
        if batch > n_train:
            raise DataError(f"study.batch_sizes: batch {batch} is larger than the training split ({n_train})")
        micro = largest_divisor_at_most(batch, fits or batch)
        steps_per_epoch = n_train // batch
        for multiplier in cfg.study.lr_grid or [1.0]:
            for seed in range(cfg.train.seed, cfg.train.seed + cfg.study.seeds):
                name = run_name(batch, multiplier, seed)
                run = copy.deepcopy(config)
                run.update(pipeline="train", run_id=f"{study_id}-{name}")
                run["train"].update(batch_size=batch, micro_batch_size=micro, lr=cfg.train.lr * multiplier,
                                    seed=seed, max_epochs=cfg.study.max_epochs, max_steps=cfg.study.max_steps)
                run["eval"].update(every_steps=max(1, round(steps_per_epoch / cfg.study.evals_per_epoch)),
                                   patience=NEVER if cfg.eval.stop_at_target else cfg.eval.patience * evals_per_eval)
                run["probe"]["enabled"] = False  # the batch sizes are decided
                run["tracking"]["group"] = cfg.tracking.group or study_id  # one W&B group per study (wandb_group)
                runs.append({"name": name, "batch_size": batch, "lr_multiplier": multiplier, "seed": seed,
                             "config": run})
    return runs


# ---------------------------------------------------------------- one run

def run_one(run: Dict, dataset_path: str, study_dir: str) -> Dict:
    """Train and evaluate one run of the study in its own directory; its row for study.json.
    A run that fails is recorded as failed (with its one-line reason), not lost."""
    from components import evaluate, train

    run_dir = storage.local_path(study_dir) / RUNS_DIR / run["name"]
    base = {k: run[k] for k in ("name", "batch_size", "lr_multiplier", "seed")}
    base["run_dir"] = f"{RUNS_DIR}/{run['name']}"
    try:
        outcome = train.run(run["config"], dataset_path, str(run_dir / train.MODEL_FILE), str(run_dir),
                            progress=False)
        summary = evaluate.run(run["config"], dataset_path, str(run_dir / train.MODEL_FILE), outcome, str(run_dir))
    except UserInputError as exc:
        return {**base, "status": "failed", "error": str(exc), "reached_target": False}
    except Exception as exc:  # noqa: BLE001 - one broken batch size must not lose the others
        return {**base, "status": "failed", "error": f"{type(exc).__name__}: {exc}", "reached_target": False}
    return {**base, **row_from_summary(summary, run["config"]["eval"]["monitor"])}


def row_from_summary(summary: Dict, monitor: str) -> Dict:
    n_train = summary["counts"]["train"]
    samples = summary["samples_to_target"]
    return {
        "status": summary["status"], "micro_batch_size": summary["micro_batch_size"],
        "accumulation_steps": summary["accumulation_steps"], "lr": summary["lr"],
        "reached_target": summary["steps_to_target"] is not None,
        "steps_to_target": summary["steps_to_target"], "samples_to_target": samples,
        "epochs_to_target": samples / n_train if samples is not None else None,
        # training time: a study evaluates evals_per_epoch times an epoch, which is not training
        "time_to_target_s": summary["train_time_to_target_s"],
        "wall_time_to_target_s": summary["time_to_target_s"],
        "best_metric": summary["best_metric"]["value"], "test_metric": summary["test"].get(monitor.split("/", 1)[1]),
        "stop_reason": summary["stop_reason"], "optimizer_steps": summary["optimizer_steps"],
        "samples_seen": summary["samples_seen"], "wall_time_s": summary["wall_time_s"],
        "train_time_s": summary["wall_time_s"] - summary["eval_time_s"],
        "gns_b_simple": summary["gns_b_simple"], "data_version": summary["data_version"],
    }


# ---------------------------------------------------------------- aggregate, fit, answer

_MEASURES = ("steps_to_target", "samples_to_target", "epochs_to_target", "time_to_target_s")


def _spread(values: List[float]) -> Optional[Dict]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _median_or_inf(rows: List[Dict], key: str) -> float:
    values = [r[key] for r in rows if r.get(key) is not None]
    # a run that missed the target counts as infinitely slow, so half the seeds missing loses
    return statistics.median(values + [math.inf] * (len(rows) - len(values))) if rows else math.inf


def select_lr(rows: List[Dict], mode: str) -> Dict[int, float]:
    """Per batch, the LR multiplier that reached the target in the fewest steps (median over
    seeds); ties and misses are broken by the best validation metric."""
    sign = -1 if mode == "max" else 1
    chosen = {}
    for batch in sorted({r["batch_size"] for r in rows}):
        by_lr = {}
        for r in rows:
            if r["batch_size"] == batch:
                by_lr.setdefault(r["lr_multiplier"], []).append(r)

        def score(item):
            runs = item[1]
            best = [r["best_metric"] for r in runs if r.get("best_metric") is not None]
            return (_median_or_inf(runs, "steps_to_target"),
                    sign * statistics.median(best) if best else math.inf)

        chosen[batch] = min(by_lr.items(), key=score)[0]
    return chosen


def summarize(config: dict, rows: List[Dict], probe: Optional[dict] = None) -> Dict:
    """study.json's content from the runs' rows: per-batch aggregates, the fit, the answer."""
    cfg = parse_config(config)
    chosen = select_lr(rows, cfg.eval.mode)
    for r in rows:
        r["selected"] = chosen[r["batch_size"]] == r["lr_multiplier"]
    batches = []
    for batch, multiplier in chosen.items():
        runs = [r for r in rows if r["batch_size"] == batch and r["selected"]]
        tests = [r["test_metric"] for r in runs if r.get("test_metric") is not None]
        lrs = [r["lr"] for r in runs if r.get("lr") is not None]
        batches.append({
            "batch_size": batch, "lr": lrs[0] if lrs else None, "lr_multiplier": multiplier, "seeds": len(runs),
            "reached": sum(r["reached_target"] for r in runs),
            **{m: _spread([r.get(m) for r in runs]) for m in _MEASURES},
            "test_metric": {"mean": statistics.fmean(tests),
                            "std": statistics.stdev(tests) if len(tests) > 1 else None} if tests else None,
            "regime": None,
        })

    points = [(r["batch_size"], r["steps_to_target"]) for r in rows if r["selected"] and r["reached_target"]]
    try:
        fitted = critical_batch.fit_critical_batch([b for b, _ in points], [s for _, s in points])
        fit = {**fitted.to_dict(), "error": None}
        for b in batches:
            b["regime"] = critical_batch.regime(b["batch_size"], fitted.b_crit)
    except DataError as exc:
        fitted, fit = None, {"error": str(exc)}

    # Fastest batch: steps from the fit (which pools every batch, so one unlucky seed does not
    # decide) x seconds per step from the probe's throughput ladder (timed after a warm-up, the
    # fastest of several repeats; a run's own pace is one noisy sample), else from the runs.
    # Without a fit, the measured times decide.
    ladder = (probe or {}).get("throughput_ladder")
    for b in batches:
        done = [r for r in rows if r["batch_size"] == b["batch_size"] and r["selected"] and r.get("optimizer_steps")]
        paces = [r["train_time_s"] / r["optimizer_steps"] for r in done]
        b["seconds_per_step"] = statistics.median(paces) if paces else None
        if ladder and done:
            from components.probe import throughput_at

            b["probe_seconds_per_step"] = b["batch_size"] / throughput_at(ladder, done[0]["micro_batch_size"])
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
    runs0 = [r for r in rows if r.get("status") == "completed"]
    study = {
        "study_id": cfg.run_id, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "target": {"metric": cfg.eval.monitor, "value": cfg.eval.target, "mode": cfg.eval.mode,
                   "stop_at_target": cfg.eval.stop_at_target},
        "model": cfg.model.factory or cfg.model.name, "data": cfg.data.path or cfg.data.name,
        "data_version": runs0[0]["data_version"] if runs0 else None,
        "device": probe.get("device") if probe else None,
        "budget": {"max_epochs": cfg.study.max_epochs, "max_steps": cfg.study.max_steps},
        "lr_rule": {"lr": cfg.train.lr, "base_batch_size": cfg.train.base_batch_size,
                    "lr_scaling": cfg.train.lr_scaling, "lr_grid": cfg.study.lr_grid},
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


def answer(study: Dict, fitted) -> List[str]:
    """The plain-language conclusion at the top of the report, from the numbers alone."""
    t, batches, lines = study["target"], study["batches"], []
    goal = f"{t['metric']} {t['value']:g}"
    missed = [b["batch_size"] for b in batches if not b["reached"]]
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
    if missed:
        lines.append(f"Batch {', '.join(map(str, missed))} did not reach {goal} within the budget.")
    lines.append(generalization_check(study))
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
    retuned = "with the LR re-tuned per batch" if study["lr_rule"]["lr_grid"] else \
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


def report(config: dict, rows: List[Dict], study_dir: str, probe: Optional[dict] = None) -> Dict:
    """Write study.json, the report and the W&B study run; return the study."""
    from components import report as report_html
    from components import tracking

    cfg = parse_config(config)
    study_dir = storage.local_path(study_dir)
    study = summarize(config, rows, probe)
    # written now because the report is rendered from the study directory, exactly as
    # pipelines.report rebuilds it; written again below with where the report and W&B runs went
    storage.write_json(study_dir / STUDY_FILE, study)
    study["report"] = str(report_html.render([report_html.load_study(study_dir)], study_dir))

    tracker = tracking.Tracker(cfg.tracking, study_dir, cfg.run_id, "study", config, group=study["wandb_group"])
    tracker.summarize({"fit/" + k: v for k, v in study["fit"].items() if v is not None}
                      | {"answer": "\n".join(study["answer"])})
    study["wandb_dir"] = tracker.offline_dir
    if tracking.follows_live(cfg.tracking):
        study["wandb_report"] = publish_wandb_report(study, cfg.tracking.project)
    tracker.finish()
    storage.write_json(study_dir / STUDY_FILE, study)
    return study


def publish_wandb_report(study: Dict, project: str) -> Optional[str]:
    """The W&B Report with the study's panels (needs an API key and a server); its URL."""
    from components import report as report_html

    try:
        built = report_html.wandb_report(study, project, os.environ.get("WANDB_ENTITY"))
        built.save()
        return built.url
    except Exception as exc:  # noqa: BLE001 - the local report is the source of truth
        print(f"study: W&B report not created ({type(exc).__name__}: {exc})")
        return None


@exit_on_user_error
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="resolved config (YAML or JSON) with pipeline=study")
    parser.add_argument("--dataset", required=True, help="dataset artifact directory (from data_prep)")
    parser.add_argument("--study-dir", required=True)
    parser.add_argument("--probe", help="probe.json: its recommendation centres the default batch ladder")
    args = parser.parse_args(argv)
    from components import probe as probe_step

    config = load_config_file(args.config)
    probe = probe_step.decision(storage.read_json(args.probe)) if args.probe else None
    manifest = storage.read_json(Path(args.dataset) / "manifest.json")
    rows = [run_one(run, args.dataset, args.study_dir) for run in plan(config, manifest["counts"]["train"], probe)]
    study = report(config, rows, args.study_dir, probe)
    print("\n".join(study["answer"]))
    print(f"report: {study['report']}")


if __name__ == "__main__":
    main()
