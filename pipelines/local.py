"""Run a pipeline on this machine with kfp's local SubprocessRunner: the same graph and the
same component code as on a cluster, each task in its own Python process.

kfp's runner prints every task's log; all of it goes to pipeline.log in the run's local
directory (pipelines/outputs.py: local_dir; without kfp's colour codes) and the terminal shows a
status line per step instead (pipelines/progress.py). On failure the user gets the step's
one-line error (components.errors) or the last line of its traceback, and the path of the full
log. kfp's task artifacts and the tasks' temp files (where each step makes its scratch
directory) go to that directory's .kfp/: on this machine, never in the run's store.

Two things differ from kfp's defaults, on purpose:
- ParallelFor iterations run one at a time, in this thread. kfp's local runner fans them out on
  a thread pool of min(parallelism, 2) workers (kfp/local/orchestrator/enhanced_dag_orchestrator.py,
  ParallelExecutor), so two study runs trained at once and timed each other's contention. The
  compiled pipeline keeps `study.parallelism` for a cluster.
- Ctrl-C: the running task gets the same SIGINT (same process group) and stops on its own (train
  saves a checkpoint); we wait for it, start no further task, and raise PipelineInterrupted. A
  second Ctrl-C passes SIGINT on to the task, a third kills it (see _Interrupts).
"""

import concurrent.futures
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from contextlib import ExitStack, redirect_stderr, redirect_stdout
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Optional
from unittest import mock

from pipelines.outputs import KFP_DIR
from pipelines.progress import LogTap, Tracker, make_display, strip_ansi

LOG_FILE = "pipeline.log"


class PipelineFailed(Exception):
    def __init__(self, message: str, step: Optional[str] = None, traceback: bool = False):
        super().__init__(message)
        self.step, self.traceback = step, traceback


class PipelineInterrupted(Exception):
    def __init__(self, step: Optional[str]):
        super().__init__(f"interrupted during {step}" if step else "interrupted")
        self.step = step


class _OneAtATime:
    """Stands in for the thread pool kfp's runner runs ParallelFor iterations on: each one runs
    when submitted, in the calling thread (so Ctrl-C reaches it, and none overlap)."""

    def __init__(self, max_workers=None):
        pass

    def submit(self, fn, /, *args, **kwargs):
        future = concurrent.futures.Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as exc:  # noqa: BLE001 - kfp reads it from the future, as from its pool
            future.set_exception(exc)
        return future

    def shutdown(self, wait=True, cancel_futures=False):
        pass


class _Interrupts:
    """Ctrl-C while a task runs. The first: the task got the same SIGINT (one process group) and
    stops by itself (train saves a checkpoint); wait for it and start no other task. The second:
    pass SIGINT on to the task (for a SIGINT sent to submit alone). The third: kill it, stop now."""

    def __init__(self, tracker: Tracker):
        self.tracker, self.count, self.step = tracker, 0, None
        self.process: Optional[subprocess.Popen] = None  # the task running now

    def handler(self, signum, frame):
        self.count += 1
        if self.count == 1 and self.tracker.current:
            self.tracker.poll()  # which of a study's runs it is
            self.tracker.current.interrupted = True
            self.step = self.tracker.current.label
        process = self.process if self.process is not None and self.process.poll() is None else None
        if process is None:
            raise KeyboardInterrupt
        if self.count >= 2:
            # the task is `sh -c "... python3 -m kfp.dsl.executor_main ..."`: signal the Python too
            for pid in [process.pid, *_descendants(process.pid)]:
                try:
                    os.kill(pid, signal.SIGINT if self.count == 2 else signal.SIGKILL)
                except OSError:
                    pass
            if self.count > 2:
                raise KeyboardInterrupt


def _descendants(pid: int) -> list:
    """Processes below `pid`, from /proc (Linux); none where there is no /proc."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # "pid (command) state ppid ...": the command may hold spaces and parentheses
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


class _TaskProcesses:
    """The subprocess module as kfp's SubprocessTaskHandler sees it: the same, except that it
    records each task's process and starts none after Ctrl-C."""

    def __init__(self, interrupts: _Interrupts):
        self._interrupts = interrupts

    def __getattr__(self, name):
        return getattr(subprocess, name)

    def Popen(self, *args, **kwargs):  # noqa: N802 - stands in for subprocess.Popen
        if self._interrupts.count:
            raise KeyboardInterrupt
        self._interrupts.process = subprocess.Popen(*args, **kwargs)
        return self._interrupts.process


def run_locally(pipeline: Callable, arguments: dict, local_dir: Path, progress: bool = True,
                follow: Optional[Path] = None) -> None:
    """Run the pipeline; `follow`: the run's store when it is a local directory, whose synced
    progress files the status lines show (None: step names and their lines only)."""
    from kfp import local
    from kfp.local import subprocess_task_handler
    from kfp.local.orchestrator import enhanced_dag_orchestrator

    # Artifacts land in the run's local directory, not in a pipeline_root relative to the cwd.
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(local_dir / KFP_DIR),
               raise_on_error=True)
    display = make_display(sys.stdout) if progress else None
    tracker = Tracker(follow, display)
    interrupts = _Interrupts(tracker)
    # Each task copies its code into a fresh temp dir and makes its scratch directory there:
    # keep those with the run, not in /tmp.
    task_tmp = local_dir / KFP_DIR / "tmp"
    task_tmp.mkdir(parents=True, exist_ok=True)
    sequential = SimpleNamespace(futures=SimpleNamespace(ThreadPoolExecutor=_OneAtATime,
                                                         as_completed=concurrent.futures.as_completed))
    root_handlers = logging.getLogger().handlers[:]
    with ExitStack() as stack:
        log = stack.enter_context(open(local_dir / LOG_FILE, "a"))
        tap = LogTap(log, tracker)
        # kfp's messages, warnings and tracebacks (its own threads included) stay in the log.
        stack.enter_context(redirect_stdout(tap))
        stack.enter_context(redirect_stderr(tap))
        stack.enter_context(warnings.catch_warnings())
        # Our image name has no "python" in it; the local runner uses this interpreter anyway.
        warnings.filterwarnings("ignore", message=".*non-Python base image.*")
        # Cluster-only task settings (resources, GPUs, caching) are carried in the YAML but not
        # used here; kfp says so for every task.
        warnings.filterwarnings("ignore", message=".*have no effect in the current local runner.*")
        stack.enter_context(mock.patch.dict(os.environ, {"TMPDIR": str(task_tmp)}))
        stack.enter_context(mock.patch.object(enhanced_dag_orchestrator, "concurrent", sequential))
        stack.enter_context(mock.patch.object(subprocess_task_handler, "subprocess", _TaskProcesses(interrupts)))
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGINT, interrupts.handler)
            stack.callback(signal.signal, signal.SIGINT, previous)
        tap.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} {json.dumps(sorted(arguments))}\n")
        if display:
            display.start(tracker)
            stack.callback(display.stop)
        try:
            pipeline(**arguments)
        except KeyboardInterrupt:
            raise PipelineInterrupted(interrupts.step or _label(tracker)) from None
        except RuntimeError as exc:
            if interrupts.count:
                raise PipelineInterrupted(interrupts.step or _label(tracker)) from None
            raise _failure(tracker, exc) from None
        finally:
            # kfp logs its last line with logging.info outside its own logging context, which
            # makes logging install a root handler on the stderr of that moment (our tap); a
            # later log line would go to a stream that is gone (seen as "--- Logging error ---").
            logging.getLogger().handlers[:] = root_handlers


def _label(tracker: Tracker) -> Optional[str]:
    return tracker.current.label if tracker.current else None


def _failure(tracker: Tracker, exc: Exception) -> PipelineFailed:
    """The failed step's own one-line error; else the last line of its traceback; else kfp's."""
    step = tracker.failed_step()
    if step is None:
        return PipelineFailed(strip_ansi(str(exc)))
    if step.error:
        return PipelineFailed(step.error, step.label, step.traceback)
    if step.exception:
        return PipelineFailed(f"{step.label}: {step.exception}", step.label, True)
    return PipelineFailed(f"{step.label}: the step failed without an error message", step.label, step.traceback)
