"""Where a run's files are, seen from the machine that submits it, and reading a run back.

- The run's store, `<output_dir>/<run_id>/` (components/run_store.py), local or s3://: every
  step's durable files, the manifest written last, and submit's own config.yaml, pipeline.yaml
  and pipeline.log.
- The local directory (`local_dir`): what stays on this machine: the run lock, kfp's task
  artifacts and temp files (.kfp/: the steps' scratch directories are made there) and submit's
  own copy of its files. For a local output_dir it is the run directory itself (its hidden
  entries are not run files); for s3:// a directory under $XDG_STATE_HOME keyed by output_dir
  and run id, so two runs never share one.
A run is read back only through its manifest: the summary and the study `submit` prints.
"""

import hashlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Optional

from components import storage
from components.run_record import SUMMARY_FILE, RunRecord
from components.run_store import RunStore, is_remote, join_uri
from components.study import RUNS_DIR, STUDY_FILE

KFP_DIR = ".kfp"  # in the local directory: kfp's pipeline_root and the tasks' TMPDIR


def state_root() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "convergence-pipeline"


def local_dir(output_dir: str, run_id: str) -> Path:
    if not is_remote(output_dir):
        return storage.local_path(output_dir) / run_id
    slug = re.sub(r"[^\w.-]+", "_", output_dir.split("://", 1)[1]).strip("_")[:60]
    key = hashlib.sha256(output_dir.encode()).hexdigest()[:12]
    return state_root() / "runs" / f"{slug}-{key}" / run_id


def published_extra(manifest: dict) -> dict:
    """A manifest's own fields besides its file list: what sealing it again keeps."""
    return {k: v for k, v in manifest.items() if k not in ("files", "published_at")}


def status(store: RunStore) -> Optional[str]:
    """A published run's status (its manifest's); else the note an attempt left (running, failed,
    interrupted); None for a run never started."""
    manifest = store.read_manifest()
    if manifest is not None:
        return manifest.get("status")
    try:
        return store.get_json(SUMMARY_FILE).get("status") if store.exists(SUMMARY_FILE) else None
    except (ValueError, AttributeError):
        return None


def read_summary(store: RunStore) -> dict:
    return json.loads(store.read_published(SUMMARY_FILE))


def read_study(store: RunStore) -> dict:
    return json.loads(store.read_published(STUDY_FILE))


def print_summary(summary: dict, where: str) -> None:
    """The run's summary.json (a RunRecord) as a table; any field may be missing or null."""
    from rich.console import Console
    from rich.table import Table

    r = RunRecord.from_dict(summary)

    def fmt(value, digits=4):
        if value is None:
            return "-"
        return f"{value:.{digits}g}" if isinstance(value, float) else str(value)

    best = r.best_metric or {}
    rows = [
        ("effective batch", f"{fmt(r.effective_batch_size)} = {fmt(r.micro_batch_size)} micro x "
                            f"{fmt(r.accumulation_steps)} accumulation x {fmt(r.world_size)} "
                            f"{'process' if r.world_size == 1 else 'processes'}"),
        ("learning rate", f"{fmt(r.lr)} ({r.optimizer or '-'})"),
        ("optimizer steps", fmt(r.optimizer_steps)),
        ("epochs", fmt(r.epochs, 3)),
        ("samples seen", fmt(r.samples_seen)),
        ("wall time (train)", "-" if r.wall_time_s is None else f"{r.wall_time_s:.2f} s"),
        ("best validation", "- (no finite evaluation)" if best.get("value") is None else
         f"{best.get('name')} = {fmt(best['value'])} at step {fmt(best.get('step'))}"),
        ("test", ", ".join(f"{k} {fmt(v)}" for k, v in r.test.items() if isinstance(v, (int, float))) or "-"),
        ("to target", "-" if r.steps_to_target is None else
         f"{r.target} in {r.steps_to_target} steps, {fmt(r.samples_to_target)} samples, "
         + ("-" if r.time_to_target_s is None else f"{r.time_to_target_s:.2f} s")),
        ("stop reason", fmt(r.stop_reason)),
        ("noise scale", "-" if r.gns_b_simple is None or r.status == "diverged" else
         f"B_simple ~ {r.gns_b_simple:,.0f} at the end of training"),
        ("data version", fmt(r.data_version)),
    ]
    if r.task_inferred:
        rows.insert(0, ("task", f"{r.task} (inferred from the target; set data.task to choose)"))
    if r.status not in (None, "completed"):
        rows.insert(0, ("status", str(r.status)))
    if r.resumed_from_step is not None:
        rows.append(("resumed from step", str(r.resumed_from_step)))
    if r.oom_events:
        rows.append(("out of memory", "; ".join(f"step {e['step']}: micro-batch {e['from']} -> {e['to']}"
                                                  for e in r.oom_events)))
    if r.probe:
        rows.append(("probe", "\n".join(r.probe.get("reasoning") or [])))
    table = Table(title=f"run {r.run_id}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for name, value in rows:
        table.add_row(name, value)
    Console().print(table)
    print(f"run directory: {where}")  # plain prints: paths must not be wrapped
    promotion = summary.get("promotion")  # the promote step's decision (components/promote.py)
    if promotion:
        print(f"promotion: {'promoted' if promotion['promoted'] else 'kept'}: {promotion['reason']}")
        if promotion.get("wandb_report"):  # the schedule's W&B Report (components/wandb_review.py)
            print(f"W&B report: {promotion['wandb_report']}")
    if r.wandb_dir:
        print(_wandb_sync(r.wandb_dir))


def _wandb_sync(dirs: str) -> str:
    if is_remote(dirs):  # wandb syncs local directories only
        return f"W&B (offline): download {dirs} and upload it with `wandb sync <the downloaded dirs>`"
    return f"W&B (offline): upload later with `wandb sync {dirs}`"


def print_study(study: dict, where: str) -> None:
    from rich.console import Console
    from rich.table import Table

    def med(spread, fmt="{:,.0f}"):
        return "-" if spread is None else fmt.format(spread["median"])

    t = study["target"]
    table = Table(title=f"study {study['study_id']}: to {t['metric']} {t['value']:g}", title_justify="left")
    for column in ("batch", "lr", "hit", "steps", "samples", "epochs", "time s", "test", "regime"):
        table.add_column(column, justify="left" if column == "regime" else "right")
    for b in study["batches"]:
        test = b["test_metric"]
        table.add_row(str(b["batch_size"]), f"{b['lr']:.3g}" if b["lr"] else "-", f"{b['reached']}/{b['seeds']}",
                      med(b["steps_to_target"]), med(b["samples_to_target"]), med(b["epochs_to_target"], "{:.2g}"),
                      med(b["time_to_target_s"], "{:.3g}"), f"{test['mean']:.4g}" if test else "-", b["regime"] or "-")
    console = Console(width=None if sys.stdout.isatty() else 110)  # rich assumes 80 columns in logs
    console.print(table)
    for line in study["answer"]:
        print(f"- {line}")
    print(f"report: {join_uri(where, 'report.html')}")  # plain prints: paths must not be wrapped
    if study.get("wandb_dir"):
        runs = join_uri(where, "wandb/offline-run-*") + " " + join_uri(where, RUNS_DIR, "*/wandb/offline-run-*")
        print(f"{_wandb_sync(runs)} (group {study['study_id']})")
    if study.get("wandb_report"):
        print(f"W&B report: {study['wandb_report']}")
