"""Step: the convergence study. Training runs that differ only in the effective batch size
(and the LR that goes with it), each until `eval.target` or its budget; then steps, samples,
epochs and time to target per batch, the fitted critical batch size, and the report.

Three parts, so the pipeline can fan the batch sizes out (pipelines/graph.py):
  plan(config, n_train, probe)          -> one entry per batch size
  run_batch(entry, dataset, store)      -> that batch's rows: its LR search, run by run, in
                                           one task (components/lr_search.py decides what next)
  report(config, rows, store)           -> study.json, report.html + PNGs, the W&B study run
                                           (components/study_summary.py: aggregates, fit, answer)
The study's store is `<output_dir>/<study id>/` (components/run_store.py); each run trains in
its own scratch directory into the child store runs/<name>/ and is sealed on its own by
evaluate; the report seals the study last, over every run's files.

    python -m components.study --config config.yaml --dataset dataset/ --study-dir runs/s1 [--probe probe.json]
runs all three in this process, one batch after another.
"""

import argparse
import copy
import math
import os
import shutil
import statistics
from pathlib import Path
from typing import Dict, List, Optional

from components import lr_search, run_store, storage
from components.config import for_dataset, largest_divisor_at_most, load_config_file, parse_config
from components.cpu import configure_threads
from components.errors import DataError, UserInputError, exit_on_user_error
from components.run_record import RunRecord
from components.run_store import RunStore, join_uri
from components.study_summary import resolved, summarize

STUDY_FILE = "study.json"
RUNS_DIR = "runs"  # <study_dir>/runs/<run name>/: each run's own directory, as a training run has
NEVER = 10 ** 9  # patience of a study run that stops at the target: only the target or the budget stop it
WARM_STEPS = 5  # a run's first steps are slow (allocations, caches): its pace is timed after them
SUFFIX = {lr_search.REMEASURE: "-fine", lr_search.LONGER: "-longer"}  # a repeated run gets its own directory


def _for_dataset(config: dict, manifest: Optional[dict]) -> dict:
    return for_dataset(config, manifest) if manifest else config


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


def run_name(batch: int, lr_multiplier: float, seed: int, kind: str = lr_search.GRID, attempt: int = 1) -> str:
    """b64-lr0.5x-s0; a repeat of that run adds its kind (-fine, -longer) and, past the first
    repeat of a kind, its count: every attempt has its own directory."""
    return f"b{batch}-lr{lr_multiplier:g}x-s{seed}" + SUFFIX.get(kind, "") + (str(attempt) if attempt > 1 else "")


def plan(config: dict, n_train: int, probe: Optional[dict] = None, manifest: Optional[dict] = None) -> List[Dict]:
    """One entry per batch size: what its runs share (the config of a run at x1, seed
    train.seed), its micro-batch (the largest that fits, from the probe's memory fit or
    train.micro_batch_size, dividing the batch) and its budget; run_batch does the rest."""
    config = _for_dataset(config, manifest)
    cfg = parse_config(config)
    study_id = cfg.run_id
    if probe is not None:
        fits = probe["max_micro_batch_size"]
    elif isinstance(cfg.train.micro_batch_size, int):
        fits = cfg.train.micro_batch_size
    else:
        fits = None  # no probe, micro-batch "auto": the whole batch in one pass
    by_noise = cfg.study.lr_centre == "noise_scale" and cfg.train.optimizer == "sgd"  # the prior is SGD's
    entries = []
    for batch in batch_ladder(config, n_train, probe):
        if batch > n_train:
            raise DataError(f"study.batch_sizes: batch {batch} is larger than the training split ({n_train})")
        micro = largest_divisor_at_most(batch, fits or batch)
        steps_per_epoch = n_train // batch
        budget = cfg.study.max_epochs * steps_per_epoch
        base = copy.deepcopy(config)
        base.update(pipeline="train", run_id=None)
        base["train"].update(batch_size=batch, micro_batch_size=micro, max_epochs=cfg.study.max_epochs,
                             max_steps=cfg.study.max_steps)
        base["probe"]["enabled"] = False  # the batch sizes are decided
        base["tracking"]["group"] = cfg.tracking.group or study_id  # one W&B group per study (wandb_group)
        centre = lr_search.lr_centre(batch, (probe or {}).get("b_simple"), cfg.train.base_batch_size,
                                     cfg.train.lr_scaling) if by_noise else 1.0
        entries.append({
            "name": f"b{batch}", "study_id": study_id, "batch_size": batch, "micro_batch_size": micro,
            "lr_centre": centre,
            "steps_per_epoch": steps_per_epoch, "budget_steps": min(budget, cfg.study.max_steps or budget),
            # eval.patience counts the pipeline's evaluations (once per epoch by default); a study
            # run keeps the same patience in steps, whatever its own cadence
            "patience_steps": None if cfg.eval.stop_at_target else
            cfg.eval.patience * (cfg.eval.every_steps or steps_per_epoch),
            "config": base})
    return entries


def run_config(entry: Dict, name: str, multiplier: float, seed: int, every: int, cap: Optional[int]) -> Dict:
    """The full config of one run of a batch's search."""
    run = copy.deepcopy(entry["config"])
    run["run_id"] = f"{entry['study_id']}-{name}"
    # output_dir is the study's parent: a run's files go to its child store (run_one), not to <output_dir>/<run_id>
    if run.get("resume_from"):  # a study resumed from another: each run from that study's run of the same name
        run["resume_from"] = join_uri(run["resume_from"], RUNS_DIR, name)
    budget = run["train"]["max_steps"]
    run["train"].update(lr=run["train"]["lr"] * multiplier, seed=seed,
                        max_steps=min(cap, budget or cap) if cap else budget)
    if cap and run["train"]["schedule"] != "constant":
        # a cap stops the run early; its LR schedule still spans the batch's budget, so a capped run
        # follows the uncapped one step for step (a cosine over the cap decayed it faster). Only a
        # decaying schedule reads it: unset elsewhere, those runs keep their config hash
        run["train"]["schedule_steps"] = entry["budget_steps"]
    patience = NEVER if entry["patience_steps"] is None else math.ceil(entry["patience_steps"] / every)
    run["eval"].update(every_steps=every, patience=patience)
    return run


# ---------------------------------------------------------------- one batch size, one run

def study_store(entry: Dict, where=None) -> RunStore:
    """The study's store: `where` (a RunStore or location) or `<output_dir>/<study id>`."""
    return run_store.open_run({**entry["config"], "run_id": entry["study_id"]}, where)


def run_batch(entry: Dict, dataset_path: str, store=None, runner=None) -> List[Dict]:
    """The batch's LR search, one run after another in this process; every run's row.
    `store`: the study's store (see study_store). `runner` (run_one's signature) trains one
    run; tests script it."""
    runner = runner or run_one
    store = study_store(entry, store)
    store.unpublish()  # its runs are about to change: the report seals the study again
    rules = lr_search.Rules.of(parse_config(entry["config"]), entry.get("lr_centre", 1.0))
    rows: List[Dict] = []
    # every kind of run is bounded (lr_search.decide); this only guards against a rule that loops
    limit = 4 * (len(rules.grid) + rules.extensions + rules.retries) * (len(rules.seeds) + len(rules.confirm))
    for _ in range(limit):
        decision = lr_search.decide(rows, rules)
        if not decision.next_runs:
            break
        multiplier, seed, kind = decision.next_runs[0]
        earlier = [r for r in lr_search.effective(rows) if (r["lr_multiplier"], r["seed"]) == (multiplier, seed)]
        every = lr_search.eval_every(rows, rules, entry["steps_per_epoch"], entry["budget_steps"],
                                     earlier[0] if kind == lr_search.REMEASURE else None)
        cap = lr_search.step_cap(rows, rules, multiplier)
        names = {r["name"] for r in rows}
        attempt = next(n for n in range(1, len(rows) + 2)
                       if run_name(entry["batch_size"], multiplier, seed, kind, n) not in names)
        name = run_name(entry["batch_size"], multiplier, seed, kind, attempt)
        row = {**runner(entry, name, multiplier, seed, kind, every, cap, dataset_path, store),
               "lr_centre": entry.get("lr_centre", 1.0)}  # so the report can replay the search
        for r in earlier:  # a remeasured or longer run replaces the first one
            r["superseded"] = True
        rows.append(row)
        result = (f"target at step {row['steps_to_target']}" if row["reached_target"] else
                  row["status"] if row["status"] != lr_search.COMPLETED else f"stopped ({row['stop_reason']})")
        print(f"study_run: batch {entry['batch_size']}: {row['name']} ({kind}, lr {row['lr'] or 0:.3g}, "
              f"evaluated every {every} steps{f', capped at {cap}' if cap else ''}): {result}", flush=True)
    else:
        print(f"study_run: batch {entry['batch_size']}: the LR search stopped after {limit} runs", flush=True)
    return rows


def run_one(entry: Dict, name: str, multiplier: float, seed: int, kind: str, every: int, cap: Optional[int],
            dataset_path: str, store: RunStore) -> Dict:
    """Train and evaluate one run into its own store (runs/<name>/ of the study's); its row for
    study.json. A run that fails is recorded as failed (with its one-line reason), a diverged
    run as diverged."""
    from components import evaluate, train

    config = run_config(entry, name, multiplier, seed, every, cap)
    run = store.child(f"{RUNS_DIR}/{name}")
    cfg = parse_config(config)
    base = {"name": name, "batch_size": entry["batch_size"], "lr_multiplier": multiplier, "seed": seed,
            "search": kind, "eval_every_steps": every, "step_cap": cap, "run_dir": f"{RUNS_DIR}/{name}",
            "monitor": cfg.eval.monitor, "mode": cfg.eval.mode}
    configure_threads(cfg.train)
    try:
        with storage.scratch_dir(f"study_run-{name}-") as scratch:  # the model artifact evaluate reads
            model = str(scratch / train.MODEL_FILE)
            outcome = train.run(config, dataset_path, model, run, progress=False)
            # a diverged run without a finite evaluation has no model: evaluate says so in its summary
            summary = evaluate.run(config, dataset_path, model, outcome, run)
        metrics = storage.parse_jsonl(run.read_published("metrics.jsonl"))
    except Exception as exc:  # noqa: BLE001 - one broken run must not lose the others
        error = str(exc) if isinstance(exc, UserInputError) else f"{type(exc).__name__}: {exc}"
        return {**base, "status": lr_search.FAILED, "error": error, "reached_target": False, "lr": None}
    row = row_from(RunRecord.from_dict(summary), cfg.eval.monitor, metrics)
    row["capped"] = bool(cap) and not row["reached_target"] and row["optimizer_steps"] >= cap
    return {**base, **row}


def warm_seconds_per_step(metrics: List[Dict], skip: int = WARM_STEPS, block: int = 10) -> Optional[float]:
    """A run's typical seconds per optimizer step once warm: each step row's wall time minus the
    row before it (the step before, or the evaluation after it, which is not training), after
    the first `skip` steps; the median of the means of `block` consecutive steps. Means first,
    because metrics.jsonl keeps wall times to 0.1 ms, a quarter of a small model's step: a
    median of single steps would snap to that grid."""
    deltas, previous = [], None
    for row in metrics:
        if "wall_time_s" not in row:
            continue
        if "train/loss" in row and previous is not None and row["step"] > skip:
            deltas.append(row["wall_time_s"] - previous)
        previous = row["wall_time_s"]
    return block_median(deltas, block) if deltas else None


def block_median(values: List[float], block: int = 10) -> float:
    """The median of the means of `block` consecutive values: of the full blocks, or of the one
    short block when there is no full one."""
    blocks = [values[i:i + block] for i in range(0, len(values), block)]
    blocks = [b for b in blocks if len(b) == block] or blocks[:1]
    return statistics.median(statistics.fmean(b) for b in blocks)


def row_from(record: RunRecord, monitor: str, metrics: List[Dict]) -> Dict:
    """A run's row for study.json from its record (summary.json). Diverged is the trainer's
    status (components/early_stopping.py): its steps to target are not a result, left out."""
    diverged = record.status == lr_search.DIVERGED
    reached = not diverged and record.reached_target
    return {
        "status": lr_search.DIVERGED if diverged else lr_search.COMPLETED, "divergence": record.divergence,
        "micro_batch_size": record.micro_batch_size, "accumulation_steps": record.accumulation_steps,
        "lr": record.lr, "reached_target": reached,
        "steps_to_target": record.steps_to_target if reached else None,
        "samples_to_target": record.samples_to_target if reached else None,
        "epochs_to_target": record.epochs_to_target if reached else None,
        # training time: a study evaluates often to measure steps precisely, which is not training
        "time_to_target_s": record.train_time_to_target_s if reached else None,
        "wall_time_to_target_s": record.time_to_target_s if reached else None,
        "best_metric": record.best_metric.get("value"),
        "test_metric": record.test.get(monitor.split("/", 1)[1]),
        "stop_reason": record.stop_reason, "optimizer_steps": record.optimizer_steps,
        "samples_seen": record.samples_seen, "wall_time_s": record.wall_time_s or 0.0,
        "train_time_s": record.train_time_s or 0.0,
        "seconds_per_step": warm_seconds_per_step(metrics),
        "gns_b_simple": record.gns_b_simple, "data_version": record.data_version,
    }


# ---------------------------------------------------------------- report

def flatten(rows: List) -> List[Dict]:
    """The rows of every run: study_run tasks return one list per batch size."""
    return [r for item in rows for r in (item if isinstance(item, list) else [item])]


def report(config: dict, rows: List, store=None, probe: Optional[dict] = None, html_out: Optional[str] = None) -> Dict:
    """Write study.json, the report and the W&B study run into the study's store (a RunStore or
    location; None: `<output_dir>/<run_id>`), then seal it; return the study. `html_out`: also
    copy report.html there (the pipeline's HTML artifact)."""
    from components import report as report_html
    from components import tracking

    rows = flatten(rows)
    config = resolved(config, rows)
    store = run_store.open_run(config, store)
    study = summarize(config, rows, probe)
    cfg = parse_config(config)
    with storage.scratch_dir(f"study_report-{cfg.run_id}-") as scratch:
        # the runs' metrics through their manifests, so the report is drawn from the study's files
        # exactly as pipelines.report rebuilds it
        for row in rows:
            run = store.child(row["run_dir"])
            manifest = run.read_manifest()
            if manifest is not None and "metrics.jsonl" in manifest["files"]:
                run.fetch(scratch / row["run_dir"], ["metrics.jsonl"])
        storage.write_json(scratch / STUDY_FILE, study)
        written = report_html.render([report_html.load_study(scratch)], scratch)
        study["report"] = join_uri(store.uri, written.name)
        if html_out:
            shutil.copyfile(written, html_out)

        tracker = tracking.Tracker(cfg.tracking, scratch, cfg.run_id, "study", config, group=study["wandb_group"])
        tracker.summarize({"fit/" + k: v for k, v in study["fit"].items() if v is not None}
                          | {"answer": "\n".join(study["answer"])})
        study["wandb_dir"] = tracker.offline_dir and join_uri(store.uri, Path(tracker.offline_dir)
                                                              .relative_to(scratch).as_posix())
        if tracking.follows_live(cfg.tracking):
            study["wandb_report"] = publish_wandb_report(study, cfg.tracking)
        tracker.finish()
        storage.write_json(scratch / STUDY_FILE, study)  # again: with where the report and W&B runs went
        store.sync(scratch, [k for k in run_store.local_files(scratch) if not k.startswith(RUNS_DIR + "/")])
    store.seal({"kind": "study", "run_id": cfg.run_id, "status": "completed",
                "data_version": study.get("data_version"), "runs": len(rows)})
    return study


def publish_wandb_report(study: Dict, tracking_cfg, reports=None) -> Optional[str]:
    """The W&B Report with the study's panels (needs an API key and a server), saved through the
    one boundary to W&B's server (components/wandb_review.py WandbReports); its URL, or None with
    one line when W&B refuses (the local report is the source of truth)."""
    from components import report as report_html
    from components import wandb_review

    reports = reports or wandb_review.WandbReports()
    try:
        entity = tracking_cfg.entity or os.environ.get("WANDB_ENTITY") or reports.default_entity()
        return reports.save(report_html.wandb_report(study, tracking_cfg.project, entity), None)["url"]
    except Exception as exc:  # noqa: BLE001 - W&B or the network
        print(f"study: W&B report not created ({wandb_review.one_line(exc)})")
        return None


@exit_on_user_error
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="resolved config (YAML or JSON) with pipeline=study")
    parser.add_argument("--dataset", required=True, help="dataset artifact directory (from data_prep)")
    parser.add_argument("--study-dir", required=True, help="the study's store (a directory or s3://)")
    parser.add_argument("--probe", help="probe.json: its recommendation centres the default batch ladder")
    args = parser.parse_args(argv)
    from components import probe as probe_step

    config = load_config_file(args.config)
    probe = probe_step.decision(storage.read_json(args.probe)) if args.probe else None
    manifest = storage.read_json(Path(args.dataset) / "manifest.json")
    entries = plan(config, manifest["counts"]["train"], probe, manifest)
    rows = [run_batch(entry, args.dataset, args.study_dir) for entry in entries]
    study = report(_for_dataset(config, manifest), rows, args.study_dir, probe)
    print("\n".join(study["answer"]))
    print(f"report: {study['report']}")


if __name__ == "__main__":
    main()
