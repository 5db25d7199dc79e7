"""The entry point: compose the config, compile the pipeline, run it.

    python -m pipelines.submit                                  # defaults: MLP on digits, locally
    python -m pipelines.submit train.batch_size=256 train.micro_batch_size=64 eval.target=0.95
    python -m pipelines.submit data=file data.path=my.csv data.target=label
    python -m pipelines.submit run_id=my-run                    # run again to resume it
    python -m pipelines.submit resume_from=s3://bucket/runs/r1  # a new run from another run's checkpoint
    python -m pipelines.submit output_dir=s3://bucket/runs storage.endpoint_url=http://minio:9000
    python -m pipelines.submit --compile-only                   # just write the pipeline YAML
    python -m pipelines.submit pipeline=study                   # compare batch sizes: the convergence study
    python -m pipelines.submit platform=kubeflow platform.host=https://... output_dir=s3://bucket/runs data=digits

Overrides are Hydra's (key=value, group=option, +key=value), before or after the flags. Outputs
go to <output_dir>/<run_id>/ (a local directory or s3://): config.yaml, pipeline.yaml,
pipeline.log, metrics.jsonl, model.pt, summary.json, checkpoints/, wandb/, and manifest.json,
written last: the run is complete once it is there. A study writes study.json, report.html and
its PNGs, probe.json, and a directory per run under runs/. kfp's task artifacts and the lock stay
on this machine (pipelines/outputs.py: local_dir). platform=kubeflow submits the compiled pipeline
to a KFP server instead (pipelines/kubeflow.py); platform.wait prints the published run as here.

Exit status: 0 done; 2 bad config or data, or a failed step (one line says why); 3 the run
diverged (the summary says where and what to try); 130 interrupted (Ctrl-C; the run resumes).
"""

import argparse
import secrets
import shlex
import sys
import time
from pathlib import Path
from typing import Optional

import yaml

from components import dvc_source, storage
from components.config import config_hash, parse_config
from components.errors import ConfigError, DataError, StorageError, UserInputError
from components.run_record import SUMMARY_FILE, RunRecord
from components.run_store import RunStore, is_remote, join_uri, run_uri, settings_of
from components.study import RUNS_DIR
from pipelines import graph, kubeflow, outputs
from pipelines.config import compose_config, config_groups
from pipelines.local import LOG_FILE, PipelineFailed, PipelineInterrupted, run_locally
from pipelines.progress import strip_ansi
from pipelines.runlock import RunLock

EXIT_USER_ERROR, EXIT_DIVERGED, EXIT_INTERRUPTED = 2, 3, 130
CONFIG_FILE, PIPELINE_FILE = "config.yaml", "pipeline.yaml"


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)


def prepare(overrides) -> tuple:
    """Config -> (resolved config dict, the run's store, its local directory). A run started here
    gets a readable new id when none is given (the compiled pipeline carries none: graph.py).
    Local paths become absolute because the steps run in other processes. platform=kubeflow:
    (config, None, None), every location checked to be reachable from a pod (check_for_cluster)."""
    config = compose_config(overrides)
    if config["platform"]["name"] == "kubeflow":
        check_for_cluster(config)
        return config, None, None
    config["run_id"] = config["run_id"] or new_run_id()
    for key in ("output_dir", "resume_from"):
        if config[key] and not is_remote(config[key]):
            config[key] = str(storage.local_path(config[key], key).resolve())
    data = config["data"]
    if data["name"] == "file" and "://" not in data["path"]:  # s3:// is resolved at run time
        data["path"] = str(Path(data["path"]).resolve())
        if not Path(data["path"]).is_file():  # fail before a run directory exists
            raise DataError(f"data.path: no such file: {data['path']}")
    if data["name"] == "dvc":  # data.path is inside the repo; null repo: this project's checkout
        data["repo"] = dvc_source.absolute_repo(data["repo"])
        if not dvc_source.is_url(data["repo"]):  # its rev, path and remote checked now (~30 ms); the
            dvc_source.resolve(data, config.get("storage") or {})  # version is resolved when the run starts
    store = RunStore.open(run_uri(config), settings_of(config))
    return config, store, outputs.local_dir(config["output_dir"], config["run_id"])


def check_for_cluster(config: dict) -> None:
    """platform=kubeflow: each step is a pod, where this machine's paths mean nothing and the run id
    is KFP's, given when the run starts. One line for the first location a pod could not reach."""
    where = "on Kubeflow every step runs in a pod"
    if not is_remote(config["output_dir"]):
        raise ConfigError(f"output_dir: {config['output_dir']} is a path on this machine ({where}); "
                          "use output_dir=s3://bucket/prefix")
    if config["run_id"]:
        raise ConfigError(f"run_id: on Kubeflow each run's id is KFP's, given when it starts; drop "
                          f"run_id={config['run_id']}")
    for key in ("resume_from", "registry.uri"):
        section, _, name = key.rpartition(".")
        value = (config[section] if section else config)[name]
        if value and not is_remote(value):
            raise ConfigError(f"{key}: {value} is a path on this machine ({where}); use an s3:// location")
    data = config["data"]
    if data["name"] == "dvc" and not dvc_source.is_url(data["repo"] or ""):
        raise DataError(f"data.repo: {data['repo'] or 'null (this checkout)'} is on this machine ({where}); use "
                        "data.repo=<a git URL>, data=file data.path=s3://bucket/key, or data=digits")
    if data["name"] == "file" and not is_remote(data["path"]):
        raise DataError(f"data.path: {data['path']} is on this machine ({where}); use data.path=s3://bucket/key, "
                        "data=dvc data.repo=<a git URL>, or data=digits")


def check_device(config: dict) -> None:
    """The local runner trains on this machine: a device it does not have fails now, not in 30 s."""
    if config["train"]["device"] != "cuda":
        return
    import torch

    if not torch.cuda.is_available():
        why = "a CPU-only build" if torch.version.cuda is None else "no CUDA device visible"
        raise ConfigError(f"train.device: cuda is not available here (torch {torch.__version__}, {why}); "
                          "use train.device=auto or cpu")


def lock_run(config: dict, local: Path) -> RunLock:
    """The local directory's first write, so an output_dir we cannot write to fails before any work."""
    try:
        return RunLock(local, config["run_id"]).acquire()
    except OSError as exc:
        if is_remote(config["output_dir"]):
            raise ConfigError(f"XDG_STATE_HOME: cannot write to {local.parent} (a run in s3:// keeps its lock and "
                              f"kfp's task artifacts there): {exc.strerror or exc}") from None
        raise ConfigError(f"output_dir: cannot write to {config['output_dir']}: {exc.strerror or exc}") from None


def check_same_run(config: dict, saved: Optional[dict]) -> None:
    """Same run id: resume, but only the same computation. Both configs come from this kind of
    submit (data.version unknown yet), so their hashes include the data's location; resuming on
    another machine is resume_from, checked by the train step on the versioned hash."""
    if saved is not None and config_hash(parse_config(saved)) != config_hash(parse_config(config)):
        raise ConfigError(f"run_id: {config['run_id']} already exists in {config['output_dir']} with a different "
                          "config; choose another run_id to start a new run")


def check_resume_from(config: dict) -> None:
    """A run to resume from must hold a checkpoint (a study: runs): said now, not after data_prep
    and the probe. Whether it is the same computation is the train step's check."""
    from components.training import CHECKPOINT

    uri = config["resume_from"]
    if not uri:
        return
    source = RunStore.open(uri, settings_of(config))
    if config["pipeline"] == "study" and not source.list(f"{RUNS_DIR}/"):
        raise ConfigError(f"resume_from: {uri} holds no study runs ({RUNS_DIR}/); name a study's location, "
                          "<output_dir>/<study id>")
    if config["pipeline"] == "train" and not source.exists(CHECKPOINT):
        raise ConfigError(f"resume_from: {uri} holds no {CHECKPOINT}; name a run's location, "
                          "<output_dir>/<run_id>, that has checkpointed")


def begin_attempt(config: dict, store: RunStore) -> None:
    """The store's first use (a missing bucket or an unreachable endpoint fails here, in one line,
    before any work). An existing run is hidden while this attempt changes its files."""
    check_same_run(config, yaml.safe_load(store.get_bytes(CONFIG_FILE)) if store.exists(CONFIG_FILE) else None)
    check_resume_from(config)
    if store.is_published():
        store.unpublish()
    elif outputs.status(store) in ("failed", "interrupted"):
        store.delete(SUMMARY_FILE)  # that attempt's note; this attempt writes its own


def save_submit_files(config: dict, local: Path, store: Optional[RunStore]):
    """config.yaml and the compiled pipeline.yaml (graph.py: no run id in it), into the local
    directory and (for a run) the store."""
    from kfp import compiler

    storage.write_text(local / CONFIG_FILE, yaml.safe_dump(config, sort_keys=False))
    pipeline = graph.build_pipeline(config)
    compiler.Compiler().compile(pipeline, str(local / PIPELINE_FILE))
    if store is not None:
        for name in (CONFIG_FILE, PIPELINE_FILE):
            store.put_file(local / name, name)
    return pipeline


def store_log(store: RunStore, local: Path) -> None:
    """pipeline.log into the store; a sealed run is sealed again, so its manifest lists the log."""
    store.put_file(local / LOG_FILE, LOG_FILE)
    manifest = store.read_manifest()
    if manifest is not None:
        store.seal(outputs.published_extra(manifest))


def save_note(store: RunStore, local: Path, note: dict) -> None:
    """A failed or interrupted attempt's summary.json (and its log): here, and in the store when it
    answers (when the store is what failed, the local copies are what is left)."""
    storage.write_json(local / SUMMARY_FILE, note)
    try:
        store.put_file(local / SUMMARY_FILE, SUMMARY_FILE)
        if (local / LOG_FILE).exists():
            store.put_file(local / LOG_FILE, LOG_FILE)
    except StorageError:
        pass


def _store_log_if_it_answers(store: RunStore, local: Path) -> None:
    try:
        store_log(store, local)
    except (StorageError, OSError):  # the local log is kept either way
        pass


def _failed_step(store: RunStore) -> Optional[str]:
    """The step that failed, as the exit handler (components/finalize.py) found it and wrote it into
    the run's summary.json; its error line is the step's own, as here."""
    try:
        return store.get_json(SUMMARY_FILE).get("step") if store.exists(SUMMARY_FILE) else None
    except (StorageError, ValueError, AttributeError):  # absent, unreadable or not a dict: no step to name
        return None


def _status(store: RunStore) -> Optional[str]:
    try:
        return outputs.status(store)
    except StorageError:
        return None


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


def _interrupted(config, store, local, step, overrides) -> int:
    if store is None:  # before a local run had a store, or platform=kubeflow (the run goes on there)
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    resume = resume_command(config["run_id"], overrides)
    if _status(store) in ("completed", "diverged"):  # sealed before Ctrl-C: it stays, with its whole log
        _store_log_if_it_answers(store, local)
    elif (local / CONFIG_FILE).exists():
        save_note(store, local, {"run_id": config["run_id"], "status": "interrupted", "step": step, "resume": resume})
    print(f"interrupted{f' during {step}' if step else ''}; resume with: {resume}", file=sys.stderr)
    return EXIT_INTERRUPTED


def _failed(config, store, local, exc: PipelineFailed) -> int:
    if _status(store) == "diverged":  # a step that stops on divergence: report it as such
        _store_log_if_it_answers(store, local)
        return _diverged(outputs.read_summary(store), store.uri)
    # The run keeps config, compiled pipeline and log; it is not published (no manifest).
    message = strip_ansi(str(exc))
    save_note(store, local, {"run_id": config["run_id"], "status": "failed", "step": _failed_step(store),
                             "error": message})
    print(f"error: {message}", file=sys.stderr)
    print(f"{'full traceback in' if exc.traceback else 'full log:'} {local / LOG_FILE}", file=sys.stderr)
    return EXIT_USER_ERROR


def _diverged(summary: dict, where: str) -> int:
    outputs.print_summary(summary, where)
    print(RunRecord.from_dict(summary).divergence_line(), file=sys.stderr)
    return EXIT_DIVERGED


def compile_only(config: dict, local: Path) -> int:
    """The pipeline for a cluster, written here only (it is not a run): its config carries no run id."""
    saved = local / CONFIG_FILE
    check_same_run(config, yaml.safe_load(saved.read_text()) if saved.exists() else None)
    save_submit_files(config, local, None)
    print(f"compiled the {config['pipeline']} pipeline to {local / PIPELINE_FILE} (each run of it gets its own "
          "run id when it starts)")
    return 0


def on_kubeflow(config: dict, only_compile: bool) -> int:
    """platform=kubeflow: compile (no run id: KFP's, at run time) and submit the run or the schedule,
    or act on the schedule (platform.schedule_action); with platform.wait, the published run's
    summary and a local run's exit status. A schedule's compiled config has tracking.group set to
    the schedule's name when it was null (components/tracking.py: for_schedule)."""
    pf = config["platform"]
    if pf["schedule_action"]:
        kubeflow.manage_schedule(config)
        return 0
    if pf["schedule"]:  # all of the schedule's runs in one W&B group, named after it
        from components.tracking import for_schedule

        config = for_schedule(config, kubeflow.schedule_name(config))
    local = outputs.local_dir(config["output_dir"], f"submission-{new_run_id()}")  # this machine's copy
    save_submit_files(config, local, None)
    if only_compile:
        print(f"compiled the {config['pipeline']} pipeline to {local / PIPELINE_FILE} (each run of it gets KFP's "
              "run id when it starts)")
        return 0
    done = kubeflow.submit(config, local / PIPELINE_FILE)
    if done.kind != "run" or not pf["wait"]:
        return 0
    if done.state != "SUCCEEDED":
        print(f"error: run {done.run_id} ended {done.state}; its steps' logs: {done.url}", file=sys.stderr)
        return EXIT_USER_ERROR
    return report(config, RunStore.open(join_uri(config["output_dir"], done.run_id), settings_of(config)))


def report(config: dict, store: RunStore) -> int:
    """The published run (or study) printed, read through its manifest; 3 for a diverged run."""
    if config["pipeline"] == "study":
        outputs.print_study(outputs.read_study(store), store.uri)
        return 0
    summary = outputs.read_summary(store)
    if summary.get("status") == "diverged":
        return _diverged(summary, store.uri)
    outputs.print_summary(summary, store.uri)
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_intermixed_args(argv)  # flags and overrides in any order
    if args.cfg == "hydra":
        print("error: --cfg hydra: there is no Hydra app config here (submit only composes the config); "
              "--cfg job prints the resolved config", file=sys.stderr)
        return EXIT_USER_ERROR
    config = store = local = lock = None
    try:
        config, store, local = prepare(args.overrides)
        if args.print_config or args.cfg:
            print(yaml.safe_dump(config, sort_keys=False), end="")
            return 0
        if config["platform"]["name"] == "kubeflow":
            return on_kubeflow(config, args.compile_only)
        if not args.compile_only:
            check_device(config)
        lock = lock_run(config, local)
        if args.compile_only:
            return compile_only(config, local)
        begin_attempt(config, store)
        pipeline = save_submit_files(config, local, store)
        probe = "probe -> " if config["probe"]["enabled"] else ""
        promote = " -> promote" if config["registry"]["enabled"] else ""
        steps = f"resolve_data -> data_prep -> {probe}" + (f"train -> evaluate{promote}" if config["pipeline"] == "train"
                                                           else "an LR search per batch size -> report")
        where = f"outputs: {store.uri}, " if is_remote(store.uri) else ""
        print(f"{config['pipeline']} {config['run_id']}: {steps} with kfp's local runner "
              f"({where}log: {local / LOG_FILE})", flush=True)
        run_locally(pipeline, graph.run_arguments(config), local, progress=not args.no_progress,
                    follow=None if is_remote(store.uri) else local)
        store_log(store, local)
        return report(config, store)
    except UserInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except PipelineFailed as exc:
        return _failed(config, store, local, exc)
    except PipelineInterrupted as exc:
        return _interrupted(config, store, local, exc.step, args.overrides)
    except KeyboardInterrupt:  # outside the pipeline: composing, compiling
        return _interrupted(config, store, local, None, args.overrides)
    finally:
        if lock is not None:
            lock.release()


if __name__ == "__main__":
    sys.exit(main())
