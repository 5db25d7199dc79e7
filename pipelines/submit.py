"""The entry point: compose the config, compile the pipeline, run it.

    python -m pipelines.submit                                  # defaults: MLP on digits, locally
    python -m pipelines.submit train.batch_size=256 train.micro_batch_size=64 eval.target=0.95
    python -m pipelines.submit data=file data.path=my.csv data.target=label
    python -m pipelines.submit run_id=my-run                    # run again to resume it
    python -m pipelines.submit --compile-only                   # just write the pipeline YAML
    python -m pipelines.submit pipeline=study                   # compare batch sizes: the convergence study

Overrides are Hydra's (key=value, group=option, +key=value), before or after the flags. Outputs
go to <output_dir>/<run_id>/: config.yaml, pipeline.yaml, pipeline.log, metrics.jsonl, model.pt,
summary.json, checkpoints/, wandb/ and kfp/ (the task artifacts). A study writes study.json,
report.html and its PNGs, probe.json, and a directory per run under runs/.

Exit status: 0 done; 2 bad config or data, or a failed step (one line says why); 3 the run
diverged (the summary says where and what to try); 130 interrupted (Ctrl-C; the run resumes).
"""

import argparse
import json
import secrets
import shlex
import sys
import time
from pathlib import Path

import yaml

from components import dvc_source, storage
from components.config import config_hash, parse_config
from components.errors import ConfigError, DataError, UserInputError
from components.run_record import RunRecord
from components.study import RUNS_DIR, STUDY_FILE
from pipelines import graph
from pipelines.config import compose_config, config_groups
from pipelines.local import LOG_FILE, PipelineFailed, PipelineInterrupted, run_locally
from pipelines.progress import strip_ansi
from pipelines.runlock import RunLock

EXIT_USER_ERROR, EXIT_DIVERGED, EXIT_INTERRUPTED = 2, 3, 130
SUMMARY_FILE = "summary.json"


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)


def prepare(overrides) -> tuple:
    """Config -> (resolved config dict, run directory). Local paths become absolute because
    the steps run in other processes (and, on a cluster, other machines)."""
    config = compose_config(overrides)
    config["run_id"] = config["run_id"] or new_run_id()
    config["output_dir"] = str(storage.local_path(config["output_dir"]).resolve())
    data = config["data"]
    if data["name"] == "file" and "://" not in data["path"]:  # s3:// is resolved at run time
        data["path"] = str(Path(data["path"]).resolve())
        if not Path(data["path"]).is_file():  # fail before a run directory exists
            raise DataError(f"data.path: no such file: {data['path']}")
    if data["name"] == "dvc":  # data.path is inside the repo; null repo: this project's checkout
        data["repo"] = dvc_source.absolute_repo(data["repo"])
        if not dvc_source.is_url(data["repo"]):  # its rev, path and remote checked now (~30 ms); the
            dvc_source.resolve(data, config.get("storage") or {})  # version is resolved when the run starts
    return config, Path(config["output_dir"]) / config["run_id"]


def check_device(config: dict) -> None:
    """The local runner trains on this machine: a device it does not have fails now, not in 30 s."""
    if config["train"]["device"] != "cuda":
        return
    import torch

    if not torch.cuda.is_available():
        why = "a CPU-only build" if torch.version.cuda is None else "no CUDA device visible"
        raise ConfigError(f"train.device: cuda is not available here (torch {torch.__version__}, {why}); "
                          "use train.device=auto or cpu")


def lock_run(config: dict, run_dir: Path) -> RunLock:
    """The run directory's first write, so an output_dir we cannot write to fails before any work."""
    try:
        return RunLock(run_dir, config["run_id"]).acquire()
    except OSError as exc:
        raise ConfigError(f"output_dir: cannot write to {config['output_dir']}: {exc.strerror or exc}") from None


def check_same_run(config: dict, run_dir: Path) -> None:
    saved = run_dir / "config.yaml"
    if saved.exists():  # same run id: resume, but only the same computation
        before = config_hash(parse_config(yaml.safe_load(saved.read_text())))
        if before != config_hash(parse_config(config)):
            raise ConfigError(f"run_id: {config['run_id']} already exists in {run_dir.parent} with a different "
                              "config; choose another run_id to start a new run")
    if _status(run_dir) in ("failed", "interrupted"):
        (run_dir / SUMMARY_FILE).unlink()  # that attempt's note; this attempt writes its own


def _status(run_dir: Path):
    try:
        return storage.read_json(run_dir / SUMMARY_FILE).get("status")
    except (OSError, ValueError, AttributeError):
        return None


def compile_pipeline(config: dict, package_path: Path):
    from kfp import compiler

    pipeline = graph.build_pipeline(config)
    package_path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(pipeline, str(package_path))
    return pipeline


def print_summary(summary: dict, run_dir: Path) -> None:
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
                            f"{fmt(r.accumulation_steps)} accumulation x {fmt(r.world_size)} process"),
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
    print(f"run directory: {run_dir}")  # plain prints: paths must not be wrapped
    if r.wandb_dir:
        print(f"W&B (offline): upload later with `wandb sync {r.wandb_dir}`")


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


def build_parser() -> argparse.ArgumentParser:
    groups, defaults = config_groups(), []
    width = max(map(len, groups))
    for group, (options, default) in groups.items():
        names = ", ".join(f"{o}*" if o == default else o for o in options)
        defaults.append(f"  {group:<{width}}  {names}" + ("  (optional)" if default is None else ""))
    epilog = ("config groups (choose with group=option; * marks the default):\n" + "\n".join(defaults) +
              "\n\nany key: section.key=value (train.lr=0.1); add a key: +model.kwargs.width=64.\n"
              "--print-config shows every key with its value.")
    parser = argparse.ArgumentParser(prog="python -m pipelines.submit", description=__doc__, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. train.batch_size=64 data=file")
    parser.add_argument("--compile-only", action="store_true", help="write pipeline.yaml and stop")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and stop")
    parser.add_argument("--cfg", "-c", choices=("job", "hydra", "all"),
                        help="Hydra's flag: job (or all) prints the resolved config, like --print-config")
    parser.add_argument("--no-progress", action="store_true", help="no status lines while the pipeline runs")
    return parser


def resume_command(run_id: str, overrides) -> str:
    kept = [o for o in overrides if not o.lstrip("+").startswith("run_id=")]
    return " ".join(["python -m pipelines.submit", f"run_id={run_id}", *map(shlex.quote, kept)])


def _interrupted(config, run_dir, step, overrides) -> int:
    if config is None:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    resume = resume_command(config["run_id"], overrides)
    # (a finished run's summary stays: Ctrl-C while its table was printing changes nothing)
    if (run_dir / "config.yaml").exists() and _status(run_dir) not in ("completed", "diverged"):
        storage.write_json(run_dir / SUMMARY_FILE, {"run_id": config["run_id"], "status": "interrupted",
                                                     "step": step, "resume": resume})
    print(f"interrupted{f' during {step}' if step else ''}; resume with: {resume}", file=sys.stderr)
    return EXIT_INTERRUPTED


def _failed(config, run_dir, exc: PipelineFailed) -> int:
    summary_path = run_dir / SUMMARY_FILE
    if _status(run_dir) == "diverged":  # a step that stops on divergence: report it as such
        return _diverged(storage.read_json(summary_path), run_dir)
    # The run directory keeps config, compiled pipeline and log; no data or model was written.
    message = strip_ansi(str(exc))
    storage.write_json(summary_path, {"run_id": config["run_id"], "status": "failed", "error": message})
    print(f"error: {message}", file=sys.stderr)
    if exc.traceback:
        print(f"full traceback in {run_dir / LOG_FILE}", file=sys.stderr)
    else:
        print(f"full log: {run_dir / LOG_FILE}", file=sys.stderr)
    return EXIT_USER_ERROR


def _diverged(summary: dict, run_dir: Path) -> int:
    print_summary(summary, run_dir)
    print(RunRecord.from_dict(summary).divergence_line(), file=sys.stderr)
    return EXIT_DIVERGED


def main(argv=None) -> int:
    args = build_parser().parse_intermixed_args(argv)  # flags and overrides in any order
    if args.cfg == "hydra":
        print("error: --cfg hydra: there is no Hydra app config here (submit only composes the config); "
              "--cfg job prints the resolved config", file=sys.stderr)
        return EXIT_USER_ERROR
    config = run_dir = lock = None
    try:
        config, run_dir = prepare(args.overrides)
        if args.print_config or args.cfg:
            print(yaml.safe_dump(config, sort_keys=False), end="")
            return 0
        if not args.compile_only:
            check_device(config)
        lock = lock_run(config, run_dir)
        check_same_run(config, run_dir)
        storage.write_text(run_dir / "config.yaml", yaml.safe_dump(config, sort_keys=False))
        pipeline = compile_pipeline(config, run_dir / "pipeline.yaml")
        if args.compile_only:
            print(f"compiled the {config['pipeline']} pipeline to {run_dir / 'pipeline.yaml'}")
            return 0
        probe = "probe -> " if config["probe"]["enabled"] else ""
        steps = f"data_prep -> {probe}" + ("train -> evaluate" if config["pipeline"] == "train" else
                                           "an LR search per batch size -> report")
        print(f"{config['pipeline']} {config['run_id']}: {steps} with kfp's local runner "
              f"(log: {run_dir / LOG_FILE})", flush=True)
        run_locally(pipeline, {"config_json": json.dumps(config), "run_dir": str(run_dir)}, run_dir,
                    progress=not args.no_progress)
        if config["pipeline"] == "study":
            print_study(storage.read_json(run_dir / STUDY_FILE), run_dir)
            return 0
        summary = storage.read_json(run_dir / SUMMARY_FILE)
        if summary.get("status") == "diverged":
            return _diverged(summary, run_dir)
        print_summary(summary, run_dir)
        return 0
    except UserInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except PipelineFailed as exc:
        return _failed(config, run_dir, exc)
    except PipelineInterrupted as exc:
        return _interrupted(config, run_dir, exc.step, args.overrides)
    except KeyboardInterrupt:  # outside the pipeline: composing, compiling
        return _interrupted(config, run_dir, None, args.overrides)
    finally:
        if lock is not None:
            lock.release()


if __name__ == "__main__":
    sys.exit(main())
