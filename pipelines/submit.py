"""The entry point: compose the config, compile the pipeline, run it.

    python -m pipelines.submit                                  # defaults: MLP on digits, locally
    python -m pipelines.submit train.batch_size=256 train.micro_batch_size=64 eval.target=0.95
    python -m pipelines.submit data=file data.path=my.csv data.target=label
    python -m pipelines.submit run_id=my-run                    # run again to resume it
    python -m pipelines.submit --compile-only                   # just write the pipeline YAML
    python -m pipelines.submit pipeline=study                   # compare batch sizes: the convergence study

Overrides are Hydra's (key=value, group=option, +key=value). Outputs go to
<output_dir>/<run_id>/: config.yaml, pipeline.yaml, pipeline.log, metrics.jsonl, model.pt,
summary.json, checkpoints/, wandb/ and kfp/ (the task artifacts). A study writes study.json,
report.html and its PNGs, probe.json, and a directory per run under runs/.
"""

import argparse
import json
import secrets
import sys
import time
from pathlib import Path

import yaml

from components import storage
from components.config import config_hash, parse_config
from components.errors import ConfigError, DataError, UserInputError
from components.study import RUNS_DIR, STUDY_FILE
from pipelines import graph
from pipelines.config import compose_config
from pipelines.local import LOG_FILE, PipelineFailed, run_locally


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)


def prepare(overrides) -> tuple:
    """Config -> (resolved config dict, run directory). Local paths become absolute because
    the steps run in other processes (and, on a cluster, other machines)."""
    config = compose_config(overrides)
    config["run_id"] = config["run_id"] or new_run_id()
    config["output_dir"] = str(storage.local_path(config["output_dir"]).resolve())
    if config["data"]["path"] and "://" not in config["data"]["path"]:
        config["data"]["path"] = str(Path(config["data"]["path"]).resolve())
        if not Path(config["data"]["path"]).is_file():  # fail before a run directory exists
            raise DataError(f"data.path: no such file: {config['data']['path']}")
    run_dir = Path(config["output_dir"]) / config["run_id"]

    saved = run_dir / "config.yaml"
    if saved.exists():  # same run id: resume, but only the same computation
        before = config_hash(parse_config(yaml.safe_load(saved.read_text())))
        if before != config_hash(parse_config(config)):
            raise ConfigError(f"run_id: {config['run_id']} already exists in {run_dir.parent} with a different "
                              "config; choose another run_id to start a new run")
    return config, run_dir


def compile_pipeline(config: dict, package_path: Path):
    from kfp import compiler

    pipeline = graph.build_pipeline(config)
    package_path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(pipeline, str(package_path))
    return pipeline


def print_summary(summary: dict, run_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    def fmt(value, digits=4):
        if value is None:
            return "-"
        return f"{value:.{digits}g}" if isinstance(value, float) else str(value)

    best, test = summary["best_metric"], summary["test"]
    rows = [
        ("effective batch", f"{summary['effective_batch_size']} = {summary['micro_batch_size']} micro x "
                            f"{summary['accumulation_steps']} accumulation x {summary['world_size']} process"),
        ("learning rate", f"{fmt(summary['lr'])} ({summary['optimizer']})"),
        ("optimizer steps", fmt(summary["optimizer_steps"])),
        ("epochs", fmt(summary["epochs"], 3)),
        ("samples seen", fmt(summary["samples_seen"])),
        ("wall time (train)", f"{summary['wall_time_s']:.2f} s"),
        ("best validation", f"{best['name']} = {fmt(best['value'])} at step {best['step']}"),
        ("test", ", ".join(f"{k} {fmt(v)}" for k, v in test.items() if isinstance(v, (int, float)))),
        ("to target", "-" if summary["steps_to_target"] is None else
         f"{summary['target']} in {summary['steps_to_target']} steps, {summary['samples_to_target']} samples, "
         f"{summary['time_to_target_s']:.2f} s"),
        ("stop reason", summary["stop_reason"]),
        ("data version", summary["data_version"]),
    ]
    if summary.get("resumed_from_step") is not None:
        rows.append(("resumed from step", str(summary["resumed_from_step"])))
    if summary.get("oom_events"):
        rows.append(("out of memory", "; ".join(f"step {e['step']}: micro-batch {e['from']} -> {e['to']}"
                                                  for e in summary["oom_events"])))
    if summary.get("probe"):
        rows.append(("probe", "\n".join(summary["probe"]["reasoning"])))
    table = Table(title=f"run {summary['run_id']}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for name, value in rows:
        table.add_row(name, value)
    Console().print(table)
    print(f"run directory: {run_dir}")  # plain prints: paths must not be wrapped
    if summary.get("wandb_dir"):
        print(f"W&B (offline): upload later with `wandb sync {summary['wandb_dir']}`")


def print_study(study: dict, study_dir: Path) -> None:
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
                      med(b["time_to_target_s"], "{:.2f}"), f"{test['mean']:.4g}" if test else "-", b["regime"] or "-")
    console = Console(width=None if sys.stdout.isatty() else 110)  # rich assumes 80 columns in logs
    console.print(table)
    for line in study["answer"]:
        print(f"- {line}")
    print(f"report: {study_dir / 'report.html'}")  # plain prints: paths must not be wrapped
    if study.get("wandb_dir"):
        print(f"W&B (offline, group {study['study_id']}): upload later with "
              f"`wandb sync {study_dir}/wandb/offline-run-* {study_dir}/{RUNS_DIR}/*/wandb/offline-run-*`")
    if study.get("wandb_report"):
        print(f"W&B report: {study['wandb_report']}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.submit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. train.batch_size=64")
    parser.add_argument("--compile-only", action="store_true", help="write pipeline.yaml and stop")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and stop")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    try:
        config, run_dir = prepare(args.overrides)
        if args.print_config:
            print(yaml.safe_dump(config, sort_keys=False), end="")
            return 0
        storage.write_text(run_dir / "config.yaml", yaml.safe_dump(config, sort_keys=False))
        pipeline = compile_pipeline(config, run_dir / "pipeline.yaml")
        if args.compile_only:
            print(f"compiled the {config['pipeline']} pipeline to {run_dir / 'pipeline.yaml'}")
            return 0
        probe = "probe -> " if config["probe"]["enabled"] else ""
        steps = f"data_prep -> {probe}" + ("train -> evaluate" if config["pipeline"] == "train" else
                                           "a training run per batch size -> report")
        print(f"{config['pipeline']} {config['run_id']}: {steps} with kfp's local runner "
              f"(log: {run_dir / LOG_FILE})", flush=True)
        run_locally(pipeline, {"config_json": json.dumps(config), "run_dir": str(run_dir)}, run_dir,
                    progress=not args.no_progress)
    except UserInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except PipelineFailed as exc:
        # The run directory keeps config, compiled pipeline and log; no data or model was written.
        storage.write_json(run_dir / "summary.json", {"run_id": config["run_id"], "status": "failed", "error": str(exc)})
        print(f"error: {exc}", file=sys.stderr)
        print(f"full log: {run_dir / LOG_FILE}", file=sys.stderr)
        return 2
    if config["pipeline"] == "study":
        print_study(storage.read_json(run_dir / STUDY_FILE), run_dir)
    else:
        print_summary(storage.read_json(run_dir / "summary.json"), run_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
