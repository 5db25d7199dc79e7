"""What the terminal shows while kfp's local runner works through a pipeline.

Everything the runner prints goes to <run_dir>/pipeline.log through a `LogTap`, which drops
kfp's colour codes and hands each line to a `Tracker`. The tracker knows which step runs (kfp's
"Executing task" / "Task ... finished" lines), the latest progress line the step printed
("<step>: <what is happening>", e.g. "probe: memory trial 2: ..."), the step's one-line error
(components.errors.ERROR_MARKER) or the last line of its traceback, and, for a training step,
the run's steps from its metrics.jsonl and how it ended from its summary.json: the copies the
train step syncs to a local run's store at start, at every checkpoint and at the end (a run in
s3:// shows its steps' lines only).

A terminal gets a live status line per step (spinner, elapsed time, the latest line or the
training bar) that turns into a tick and the seconds when the step is done; anything else
(CI logs, a pipe) gets one plain line per finished step.
"""

import json
import re
import threading
import time
from pathlib import Path
from typing import List, Optional, TextIO

from components.errors import ERROR_MARKER, brief
from components.study import RUNS_DIR  # a study's runs: <run_dir>/runs/<name>/

_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")
_TASK_START = re.compile(r" - INFO - Executing task '([^']+)'")
_TASK_END = re.compile(r" - [A-Z]+ - Task '([^']+)' finished with status (\w+)")
_STEP_LINE = re.compile(r"^\s*((?:resolve_data|data_prep|probe|train|evaluate|promote|study)\w*): (.+)$")
TRAINING_STEPS = ("train", "study_run")
_FINAL = {"train": ("trained", "diverged"), "study_run": ("trained", "diverged", "completed")}


def strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


class Training:
    """A training run followed through the files it writes (never through its process)."""

    def __init__(self, run_dir: Path):
        self.run_dir, self.offset = run_dir, 0
        self.step, self.total, self.values, self.final = 0, None, {}, None

    def poll(self, final_statuses) -> None:
        try:
            summary = json.loads((self.run_dir / "summary.json").read_text())
        except (OSError, ValueError):
            summary = {}
        if summary.get("status") == "running":  # (a summary left by an earlier attempt is not final)
            self.total, self.final = summary.get("planned_steps"), None
        self._read_metrics()
        if summary.get("status") in final_statuses and summary.get("optimizer_steps") is not None:
            # the bar ends where the run stopped, not where it was planned to
            self.step = self.total = summary["optimizer_steps"]
            planned = summary.get("planned_steps")
            reason = summary.get("stop_reason") or summary["status"]
            self.final = f"{self.step} steps, {reason}" + (f" (of {planned} planned)" if planned and
                                                           planned != self.step else "")

    def _read_metrics(self) -> None:
        try:
            with open(self.run_dir / "metrics.jsonl", "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except OSError:
            return
        complete = chunk[:chunk.rfind(b"\n") + 1]  # a row still being written waits for the next poll
        self.offset += len(complete)
        for line in complete.decode(errors="replace").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            self.step = max(self.step, row.get("step") or 0)
            for key, value in row.items():
                if (key == "train/loss" or key.startswith("val/")) and isinstance(value, (int, float)):
                    self.values[key] = value

    def detail(self) -> str:
        if self.final:
            return self.final
        # the loss, and the validation metrics (val/loss only when it is the only one)
        keys = [k for k in self.values if k != "val/loss"]
        keys = keys if any(k.startswith("val/") for k in keys) else list(self.values)
        shown = " ".join(f"{k.removeprefix('train/')} {self.values[k]:.4g}" for k in keys)
        return f"{self.step}/{self.total or '?'} steps" + (f"  {shown}" if shown else "")


class Step:
    def __init__(self, task: str):
        self.task, self.name = task, task.replace("-", "_")
        self.started, self.ended, self.started_at = time.monotonic(), None, time.time()
        self.ok: Optional[bool] = None
        self.interrupted = False  # Ctrl-C arrived while it ran
        self.message = ""          # the latest "<step>: ..." line
        self.error: Optional[str] = None      # its one-line user error
        self.exception: Optional[str] = None  # the last line of its last traceback
        self.traceback = False
        self.trainings: List[Training] = []  # a study_run step trains one run after another
        self._tb_indent: Optional[int] = None

    @property
    def training(self) -> Optional[Training]:
        return self.trainings[-1] if self.trainings else None

    @property
    def label(self) -> str:
        if self.name == "study_run" and self.training and self.ended is None:
            return f"{self.name} {self.training.run_dir.name}"
        return self.name

    @property
    def seconds(self) -> float:
        return (self.ended or time.monotonic()) - self.started

    def detail(self) -> str:
        runs, training = self.trainings, self.training
        if self.name == "study_run" and self.ended is not None and runs:
            return f"{len(runs)} run{'s' * (len(runs) != 1)}: " + "; ".join(f"{t.run_dir.name} {t.detail()}"
                                                                           for t in runs)
        if training is not None and (training.total or training.final):
            return training.detail()
        return self.message

    def observe(self, line: str) -> None:
        text = line.strip()
        indent = len(line) - len(line.lstrip())
        if ERROR_MARKER in line:
            self.error = line.split(ERROR_MARKER, 1)[1].strip()
        elif text.startswith("Traceback (most recent call last):"):
            self.traceback, self._tb_indent = True, indent
        elif self._tb_indent is not None and indent == self._tb_indent and text:
            if not text.startswith(("During handling of the above", "The above exception")):
                self.exception, self._tb_indent = brief(text), None  # the whole line stays in pipeline.log
        elif (m := _STEP_LINE.match(line)) and self._tb_indent is None:
            said = m.group(2).strip()
            self.message = said if m.group(1) == self.name else f"{m.group(1)}: {said}"


class Tracker:
    """Turns the runner's log lines into steps; tells the display what changed."""

    def __init__(self, run_dir: Optional[Path], display=None):
        self.run_dir, self.display = run_dir and Path(run_dir), display
        self.steps: List[Step] = []
        self.current: Optional[Step] = None
        self.lock = threading.RLock()
        self._followed = set()

    def line(self, line: str) -> None:
        started = ended = None
        with self.lock:  # never held while calling the display (it takes its own locks)
            if m := _TASK_START.search(line):
                started = self.current = Step(m.group(1))
                self.steps.append(started)
            elif (m := _TASK_END.search(line)) and self.current and self.current.task == m.group(1):
                ended, self.current = self.current, None
                ended.ended, ended.ok = time.monotonic(), m.group(2) == "SUCCESS"
                self.poll(ended)
            elif self.current is not None:
                self.current.observe(line)
        if self.display and started:
            self.display.started(started)
        if self.display and ended:
            self.display.ended(ended)

    def poll(self, step: Optional[Step] = None) -> None:
        """Follow the training run of a training step (the run dir, or a study's run)."""
        with self.lock:
            step = step or self.current
            if step is None or step.name not in TRAINING_STEPS or self.run_dir is None:
                return
            if step.name == "train" and not step.trainings:
                step.trainings.append(Training(self.run_dir))
            elif step.name == "study_run":
                self._follow_study_runs(step)
            for training in step.trainings if step.ended else step.trainings[-1:]:
                training.poll(_FINAL[step.name])

    def _follow_study_runs(self, step: Step) -> None:
        """While the step runs: the run now training (its summary says so). At its end: every
        run it wrote, also those too quick to be seen running."""
        if step.ended is None and step.training is not None and step.training.final is None:
            return
        summaries = [p for p in (self.run_dir / RUNS_DIR).glob("*/summary.json")
                     if p.parent not in self._followed and _mtime(p) >= step.started_at - 1]
        if step.ended is None:
            summaries = [p for p in summaries if _status(p) == "running"]
        for path in sorted(summaries, key=_mtime):
            self._followed.add(path.parent)
            step.trainings.append(Training(path.parent))

    def failed_step(self) -> Optional[Step]:
        return next((s for s in reversed(self.steps) if s.ok is False), None)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _status(path: Path) -> Optional[str]:
    try:
        return json.loads(path.read_text()).get("status")
    except (OSError, ValueError):
        return None


class LogTap:
    """A write-only text stream: the log file gets the text without colour codes, the tracker
    each complete line. kfp's runner prints from whichever thread runs a task."""

    encoding = "utf-8"

    def __init__(self, file: TextIO, tracker: Tracker):
        self.file, self.tracker = file, tracker
        self._partial = ""
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        text = strip_ansi(text)
        with self._lock:
            self.file.write(text)
            lines = (self._partial + text).split("\n")
            self._partial = lines.pop()
        for line in lines:
            self.tracker.line(line)
        return len(text)

    def flush(self) -> None:
        self.file.flush()

    def isatty(self) -> bool:
        return False

    def writable(self) -> bool:
        return True


# ---------------------------------------------------------------- displays


def _plain_line(step: Step) -> str:
    if step.ok:
        head = f"{step.label} done in {step.seconds:.1f} s"
    else:
        head = f"{step.label} {'interrupted' if step.interrupted else 'failed'} after {step.seconds:.1f} s"
    detail = step.detail()
    return f"{head}: {detail}" if detail and step.ok else head


class PlainDisplay:
    """One line per finished step (logs, pipes, CI)."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def start(self, tracker: Tracker) -> None:
        pass

    def stop(self) -> None:
        pass

    def started(self, step: Step) -> None:
        pass

    def ended(self, step: Step) -> None:
        print(_plain_line(step), file=self.stream, flush=True)


class LiveDisplay:
    """A live status line for the running step; finished steps stay above it with a tick."""

    def __init__(self, stream: TextIO):
        from rich.console import Console

        self.console = Console(file=stream)
        self.live, self.tracker = None, None
        self._spinners = {}  # one per step, so that it turns

    def start(self, tracker: Tracker) -> None:
        from rich.live import Live

        self.tracker = tracker
        self.live = Live(console=self.console, get_renderable=self._render, refresh_per_second=8,
                         transient=True, redirect_stdout=False, redirect_stderr=False)
        self.live.start()

    def stop(self) -> None:
        if self.live is not None:
            self.live.stop()

    def started(self, step: Step) -> None:
        pass

    def ended(self, step: Step) -> None:
        if self.live is not None:
            self.live.console.print(self._row(step))

    def _render(self):
        from rich.console import Group

        with self.tracker.lock:
            step = self.tracker.current
            if step is None:
                return Group()  # between steps: no line at all
            self.tracker.poll()
            return self._row(step)

    def _row(self, step: Step):
        from rich.progress_bar import ProgressBar
        from rich.spinner import Spinner
        from rich.table import Table
        from rich.text import Text

        if step.ended is None:
            icon = self._spinners.setdefault(id(step), Spinner("dots", style="cyan"))
        else:
            icon = Text("✓", style="green") if step.ok else Text("✗", style="red")
        # fixed columns first; the detail takes what is left of the line and is cut, never wrapped
        row = Table.grid(padding=(0, 1), expand=True)
        row.add_column(width=1)
        row.add_column(no_wrap=True, min_width=12)
        row.add_column(justify="right", no_wrap=True, min_width=7)
        cells = [icon, Text(step.label, style="bold"), Text(f"{step.seconds:.1f} s")]
        training = step.training
        if training is not None and training.total and (step.ended is None or len(step.trainings) == 1):
            row.add_column(width=30)
            cells.append(ProgressBar(total=training.total, completed=min(training.step, training.total), width=30))
        row.add_column(no_wrap=True, overflow="ellipsis", ratio=1)
        cells.append(Text(step.detail() if step.ok is not False else
                          "interrupted" if step.interrupted else "failed"))
        row.add_row(*cells)
        return row


def make_display(stream: TextIO):
    return LiveDisplay(stream) if stream.isatty() else PlainDisplay(stream)
