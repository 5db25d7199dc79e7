"""The entry point as a user meets it: flags, refusals before any work, one-line errors, the
run lock, Ctrl-C, exit codes, and what the terminal shows while the local runner works."""

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from components import storage
from components.run_store import RunStore
from pipelines import local, submit
from pipelines.config import CONF_DIR
from pipelines.progress import LiveDisplay, LogTap, PlainDisplay, Tracker, strip_ansi
from pipelines.runlock import LOCK_FILE

ANSI = re.compile(r"\x1b\[")
REPO = Path(__file__).resolve().parent.parent


def err_lines(capsys):
    return capsys.readouterr().err.strip().splitlines()


# ---------------------------------------------------------------- the command line


def test_flags_and_overrides_in_any_order(tmp_path, capsys):
    assert submit.main([f"output_dir={tmp_path}", "--print-config", "train.lr=0.1", "run_id=r1"]) == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert (config["train"]["lr"], config["output_dir"], config["run_id"]) == (0.1, str(tmp_path), "r1")
    assert not (tmp_path / "r1").exists()  # printing runs nothing


def test_cfg_job_prints_the_resolved_config_like_print_config(tmp_path, capsys):
    args = [f"output_dir={tmp_path}", "run_id=r1", "train.batch_size=64"]
    assert submit.main(["--print-config", *args]) == 0
    printed = capsys.readouterr().out
    assert submit.main([*args, "--cfg", "job"]) == 0
    assert capsys.readouterr().out == printed and yaml.safe_load(printed)["train"]["batch_size"] == 64
    assert submit.main([*args, "--cfg", "hydra"]) == 2
    assert err_lines(capsys) == ["error: --cfg hydra: there is no Hydra app config here (submit only composes "
                                 "the config); --cfg job prints the resolved config"]


def test_help_lists_every_config_group_and_its_options(capsys):
    with pytest.raises(SystemExit) as exit_:
        submit.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    groups = sorted(d.name for d in CONF_DIR.iterdir() if d.is_dir())
    assert len(groups) >= 8
    for group in groups:
        line = next(line for line in out.splitlines() if line.split()[:1] == [group])
        assert sorted(o.rstrip("*,") for o in line.split()[1:] if o != "(optional)") == \
            sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
    assert re.search(r"^\s+data\s+digits, dvc, example\*, file, synthetic$", out, re.M)
    assert re.search(r"^\s+experiment\s+.*\(optional\)$", out, re.M)


@pytest.mark.parametrize("override, instead", [
    ("hydra.run.dir=/tmp/x", "use output_dir=... and run_id=... instead"),
    ("hydra.job.chdir=true", "steps never change directory; relative paths resolve where you run submit"),
    ("hydra/launcher=basic", "use pipeline=study to compare batch sizes"),
    ("+hydra.job.name=x", "--help lists what can be set"),
])
def test_hydra_settings_are_refused_in_one_line(tmp_path, capsys, override, instead):
    assert submit.main([f"output_dir={tmp_path / 'out'}", override]) == 2
    (line,) = err_lines(capsys)
    key = override.lstrip("+").split("=")[0]
    assert line.startswith(f"error: {key}: Hydra's own settings have no effect here") and line.endswith(instead)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("overrides, message", [
    (["data=digits", "data.path=x.csv"],
     "data.path: only used with data=dvc or data=example or data=file; did you mean data=dvc?"),
    (["data=synthetic", "data.target=label"],
     "data.target: only used with data=dvc or data=example or data=file; did you mean data=dvc?"),
    (["data=synthetic", "data.format=csv"],
     "data.format: only used with data=dvc or data=example or data=file; did you mean data=dvc?"),
    (["data.n_classes=3"], "data.n_classes: only used with data=synthetic; did you mean data=synthetic?"),
    (["model=cnn", "model.hidden_sizes=[8]"], "model.hidden_sizes: only used with model=mlp; did you mean model=mlp?"),
])
def test_keys_of_another_group_option_are_refused_before_any_work(tmp_path, capsys, overrides, message):
    assert submit.main([*overrides, f"output_dir={tmp_path / 'out'}"]) == 2
    assert err_lines(capsys) == [f"error: {message}"]
    assert not (tmp_path / "out").exists()


def test_keys_every_option_uses_are_accepted(tmp_path, capsys):
    # model.factory and model.kwargs are in no option's yaml: they apply to any model
    args = ["--print-config", "model.factory=my_models:build", "+model.kwargs.width=3", "data=synthetic",
            "data.n_classes=3", "data.task=classification", "model=cnn", "model.channels=[4]"]
    assert submit.main(args) == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["model"]["kwargs"] == {"width": 3} and config["data"]["n_classes"] == 3


def test_cuda_without_a_gpu_is_refused_before_any_work(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    started = time.perf_counter()
    assert submit.main(["train.device=cuda", f"output_dir={tmp_path / 'out'}"]) == 2
    (line,) = err_lines(capsys)
    assert line.startswith("error: train.device: cuda is not available here (torch ") and \
        line.endswith("use train.device=auto or cpu")
    assert not (tmp_path / "out").exists() and time.perf_counter() - started < 10
    # compiling for a cluster does not need a GPU here
    assert submit.main(["--compile-only", "train.device=cuda", f"output_dir={tmp_path / 'out'}", "run_id=c"]) == 0


def test_unwritable_output_dir_is_one_line_before_any_work(tmp_path, capsys):
    (tmp_path / "afile").write_text("a file, not a directory")  # root can write anywhere, not into a file
    out = tmp_path / "afile" / "sub"
    assert submit.main([f"output_dir={out}", "run_id=r"]) == 2
    assert err_lines(capsys) == [f"error: output_dir: cannot write to {out}: Not a directory"]


# ---------------------------------------------------------------- one process per run id


HOLDER = """
import sys, time
from pathlib import Path
from pipelines.runlock import RunLock
RunLock(Path(sys.argv[1]), "r").acquire()
print("locked", flush=True)
time.sleep(60)
"""


def test_a_second_submit_of_a_running_run_id_is_refused_and_a_dead_holder_is_taken_over(tmp_path, capsys):
    run_dir = tmp_path / "out" / "r"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True,
                              cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "locked"
        lock = json.loads((run_dir / LOCK_FILE).read_text())
        assert lock["pid"] == holder.pid and lock["host"]
        args = ["--compile-only", f"output_dir={tmp_path / 'out'}", "run_id=r"]
        assert submit.main(args) == 2
        (line,) = err_lines(capsys)
        assert line.startswith(f"error: run_id: r is already running (pid {holder.pid} on {lock['host']}); ")
        assert not (run_dir / "config.yaml").exists()  # refused before writing anything
    finally:
        holder.kill()
        holder.wait()
    # the holder died without cleaning up: its lock file is left, with its PID, and is taken over
    assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == holder.pid
    assert submit.main(args) == 0
    assert (run_dir / "pipeline.yaml").exists() and not (run_dir / LOCK_FILE).exists()


# ---------------------------------------------------------------- errors, exit codes


def test_a_failing_step_shows_its_own_line_without_colour_codes(tmp_path, capsys):
    pd.DataFrame({"a": [1.0, 2.0] * 20, "b": [0.0, 1.0] * 20}).to_csv(tmp_path / "nolabel.csv", index=False)
    code = submit.main(["data=file", "data.path=nolabel.csv", "data.target=label", f"output_dir={tmp_path / 'out'}",
                        "run_id=bad", "probe.enabled=false", "train.batch_size=16", "train.micro_batch_size=16"])
    assert code == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert err[0] == "error: data.target: column 'label' not in nolabel.csv (columns: a, b)"
    assert err[1] == f"full log: {tmp_path / 'out' / 'bad' / 'pipeline.log'}" and len(err) == 2
    assert "Inner task failed" not in captured.err and not ANSI.search(captured.out + captured.err)
    assert re.search(r"^data_prep failed after \d+\.\d s$", captured.out, re.M)  # the plain step line
    log = (tmp_path / "out" / "bad" / "pipeline.log").read_text()
    assert "Task 'data-prep' finished with status FAILURE" in log and not ANSI.search(log)
    assert storage.read_json(tmp_path / "out" / "bad" / "summary.json")["status"] == "failed"


def _steps(tmp_path, lines):
    tracker = Tracker(tmp_path)
    tap = LogTap(io.StringIO(), tracker)
    for line in lines:
        tap.write(line + "\n")
    return tracker


def test_an_unexpected_exception_in_a_step_is_its_last_traceback_line(tmp_path):
    tracker = _steps(tmp_path, [
        "10:00:00.000 - INFO - Executing task \x1b[96m'train'\x1b[0m",
        "    train: loading the dataset",
        "    Traceback (most recent call last):",
        '      File "x.py", line 1, in <module>',
        "        open('x')",
        "    OSError: first",
        "",
        "    During handling of the above exception, another exception occurred:",
        "",
        "    Traceback (most recent call last):",
        '      File "y.py", line 2, in <module>',
        "    ZeroDivisionError: division by zero",
        "10:00:01.000 - ERROR - Task \x1b[96m'train'\x1b[0m finished with status \x1b[91mFAILURE\x1b[0m",
    ])
    failure = local._failure(tracker, RuntimeError("Pipeline 'p' finished with status FAILURE. Inner task failed: 'train'."))
    assert str(failure) == "train: ZeroDivisionError: division by zero" and failure.traceback
    assert tracker.steps[0].message == "loading the dataset"
    # a marked one-line error wins over the traceback that came with it
    tracker = _steps(tmp_path, [
        "10:00:00.000 - INFO - Executing task 'probe'",
        "    Traceback (most recent call last):",
        "    ValueError: width must be even",
        "    convergence-pipeline error: model.factory: my:build raised ValueError: width must be even",
        "10:00:01.000 - ERROR - Task 'probe' finished with status FAILURE",
    ])
    failure = local._failure(tracker, RuntimeError("x"))
    assert str(failure) == "model.factory: my:build raised ValueError: width must be even" and failure.traceback


def test_resolve_data_s_line_is_its_done_line_s_detail(tmp_path):
    buffer = io.StringIO()
    tracker = _steps(tmp_path, ["10:00:00.000 - INFO - Executing task 'resolve-data'",
                                "    resolve_data: data/digits.csv at efd84f1 of /repo (DVC): version abc.dir"])
    tracker.display = PlainDisplay(buffer)
    tracker.line("10:00:01.000 - INFO - Task 'resolve-data' finished with status SUCCESS")
    assert re.fullmatch(r"resolve_data done in \d+\.\d s: data/digits.csv at efd84f1 of /repo \(DVC\): "
                        r"version abc\.dir\n", buffer.getvalue())


def test_strip_ansi_removes_kfp_colours():
    assert strip_ansi("Task \x1b[96m'train'\x1b[0m finished with status \x1b[92mSUCCESS\x1b[0m") == \
        "Task 'train' finished with status SUCCESS"


DIVERGED = {"run_id": "dv", "status": "diverged", "stop_reason": "non_finite_loss", "effective_batch_size": 32,
            "micro_batch_size": 32, "accumulation_steps": 1, "world_size": 1, "lr": 1e6, "optimizer": "sgd",
            "optimizer_steps": 3, "epochs": 0.08, "samples_seen": 96, "wall_time_s": None,
            "best_metric": {"name": "val/accuracy", "value": None, "step": None}, "test": {},
            "steps_to_target": None, "samples_to_target": None, "time_to_target_s": None, "data_version": "abc",
            "divergence": {"rule": "non_finite_loss", "step": 3, "lr": 1e6,
                           "advice": "lower train.lr or add train.warmup_steps"}}


@pytest.mark.parametrize("how", ["summary", "failed step"])
def test_a_diverged_run_prints_its_summary_and_exits_3(tmp_path, capsys, monkeypatch, how):
    def fake_run(pipeline, arguments, local_dir, progress=True, follow=None):
        (local_dir / "pipeline.log").write_text("the tasks' log\n")
        store = RunStore.open(str(local_dir))  # a local run: its directory is its store
        store.put_json("summary.json", DIVERGED)
        store.seal({"status": "diverged"})  # as evaluate seals a diverged run
        if how == "failed step":
            raise local.PipelineFailed("evaluate: no finite evaluation", "evaluate")

    monkeypatch.setattr(submit, "run_locally", fake_run)
    assert submit.main([f"output_dir={tmp_path}", "run_id=dv", "probe.enabled=false", "train.batch_size=32",
                        "train.micro_batch_size=32"]) == 3
    captured = capsys.readouterr()
    assert "│ status            │ diverged" in captured.out and "- (no finite evaluation)" in captured.out
    assert captured.err.strip().splitlines() == [
        "diverged: non_finite_loss at step 3 (lr 1e+06): lower train.lr or add train.warmup_steps"]
    assert storage.read_json(tmp_path / "dv" / "summary.json") == DIVERGED  # not overwritten as "failed"


# ---------------------------------------------------------------- progress


def test_training_line_ends_at_the_step_the_run_stopped(tmp_path):
    lines = ["10:00:00.000 - INFO - Executing task 'train'"]
    tracker = _steps(tmp_path, lines)
    storage.write_json(tmp_path / "summary.json", {"status": "running", "planned_steps": 270})
    rows = [{"step": s, "train/loss": 1.0 / s} for s in range(1, 91)] + [{"step": 90, "val/accuracy": 0.95}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 91, "tr')
    tracker.poll()
    training = tracker.current.training
    assert (training.step, training.total) == (90, 270)  # the half-written row waits
    assert tracker.current.detail() == "90/270 steps  loss 0.01111 val/accuracy 0.95"
    storage.write_json(tmp_path / "summary.json", {"status": "trained", "planned_steps": 270, "optimizer_steps": 135,
                                                   "stop_reason": "early_stopping"})
    buffer = io.StringIO()
    tracker.display = PlainDisplay(buffer)
    tracker.line("10:00:02.000 - INFO - Task 'train' finished with status SUCCESS")
    assert (training.step, training.total) == (135, 135)
    assert re.fullmatch(r"train done in \d+\.\d s: 135 steps, early_stopping \(of 270 planned\)\n", buffer.getvalue())


def test_live_display_spins_then_ticks_each_step(tmp_path):
    from rich.console import Console

    buffer = io.StringIO()
    display = LiveDisplay(buffer)
    display.console = Console(file=buffer, force_terminal=True, width=100)
    tracker = Tracker(tmp_path, display)
    display.start(tracker)
    try:
        tracker.line("10:00:00.000 - INFO - Executing task 'probe'")
        tracker.line("    probe: memory trial 2: micro-batch 512 fits (1.2 MiB)")
        display.live.refresh()
        tracker.line("10:00:01.000 - INFO - Task 'probe' finished with status SUCCESS")
    finally:
        display.stop()
    screen = strip_ansi(buffer.getvalue())
    assert re.search(r"[⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏] probe +\d+\.\d s memory trial 2: micro-batch 512 fits", screen)
    assert re.search(r"✓ probe +\d+\.\d s memory trial 2: micro-batch 512 fits \(1\.2 MiB\)", screen)


# ---------------------------------------------------------------- through kfp's local runner


def _events(log: str, task: str):
    """(seconds of the day, 'start' | 'end') of each run of `task` in pipeline.log."""
    out = []
    for line in log.splitlines():
        m = re.match(rf"(\d\d):(\d\d):(\d\d\.\d+) - \w+ - (Executing task '{task}'|Task '{task}' finished)", line)
        if m:
            h, mi, s = int(m.group(1)), int(m.group(2)), float(m.group(3))
            out.append((h * 3600 + mi * 60 + s, "start" if m.group(4).startswith("Executing") else "end"))
    return out


def test_study_runs_never_overlap_locally(tmp_path, capsys):
    args = ["pipeline=study", f"output_dir={tmp_path}", "run_id=st", "probe.enabled=false", "train.batch_size=32",
            "train.micro_batch_size=16", "study.batch_sizes=[16,32]", "study.max_steps=12", "tracking.mode=disabled",
            "study.parallelism=4"]
    assert submit.main(args) == 0
    events = _events((tmp_path / "st" / "pipeline.log").read_text(), "study-run")
    assert [kind for _, kind in events] == ["start", "end"] * 2
    assert events[2][0] >= events[1][0]  # the second run started after the first had finished
    out = capsys.readouterr().out
    for step in ("data_prep", "study_plan", "study_report"):
        assert re.search(rf"^{step} done in \d+\.\d s", out, re.M)
    finished = re.findall(r"^study_run done in \d+\.\d s: (\d+) runs?: (.*)$", out, re.M)
    assert [len(runs.split("; ")) for _, runs in finished] == [int(n) for n, _ in finished] and len(finished) == 2
    assert all(run.startswith(f"b{b}-") and re.search(r" \d+ steps, \w+", run)
               for (_, runs), b in zip(finished, (16, 32)) for run in runs.split("; "))
    compiled = yaml.safe_load((tmp_path / "st" / "pipeline.yaml").read_text())
    loop = compiled["components"]["comp-exit-handler-1"]["dag"]["tasks"]["for-loop-2"]
    assert loop["iteratorPolicy"]["parallelismLimit"] == 4  # a cluster's


@pytest.mark.parametrize("how", ["the process group", "submit alone, twice"])
def test_ctrl_c_leaves_an_interrupted_summary_and_one_line(tmp_path, how):
    args = [f"output_dir={tmp_path}", "run_id=ci", "probe.enabled=false", "train.batch_size=16",
            "train.micro_batch_size=16", "train.max_epochs=1000", "eval.patience=1000", "tracking.mode=disabled"]
    process = subprocess.Popen([sys.executable, "-m", "pipelines.submit", *args], cwd=tmp_path, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                               env={**os.environ, "PYTHONPATH": str(REPO)})
    summary = tmp_path / "ci" / "summary.json"
    try:
        deadline = time.monotonic() + 90
        while not (summary.exists() and storage.read_json(summary).get("status") == "running"
                   and (tmp_path / "ci" / "metrics.jsonl").exists()):
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.1)
        if how == "the process group":
            os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        else:  # the task did not get it: the first waits for the task, the second passes it on
            process.send_signal(signal.SIGINT)
            time.sleep(0.5)
            process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    resume = "python -m pipelines.submit run_id=ci " + " ".join(a for a in args if not a.startswith("run_id="))
    assert process.returncode == 130, err
    assert err.splitlines() == [f"interrupted during train; resume with: {resume}"]
    assert storage.read_json(summary) == {"run_id": "ci", "status": "interrupted", "step": "train", "resume": resume}
    assert re.search(r"^train interrupted after \d+\.\d s$", out, re.M)
    log = (tmp_path / "ci" / "pipeline.log").read_text()
    assert "KeyboardInterrupt" in log and "Executing task 'evaluate'" not in log  # the task's own, in the log
    assert (tmp_path / "ci" / "checkpoints" / "last.pt").exists() and not (tmp_path / "ci" / LOCK_FILE).exists()


def test_the_submit_command_starts_without_loading_torch():
    """Composing, compiling and submitting need no torch; the steps load it. Importing it at start-up
    (through components.study's summary) cost `python -m pipelines.submit` ~1 s before anything ran."""
    code = "import sys, pipelines.submit, components.study; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.stdout.strip() == "False"
