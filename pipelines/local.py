"""Run a pipeline on this machine with kfp's local SubprocessRunner: the same graph and the
same component code as on a cluster, each task in its own Python process.

kfp's runner prints every task's log; we keep all of it in <run_dir>/pipeline.log and show
a progress bar read from the run's own metrics.jsonl instead. On failure the user gets the
step's one-line error (see components.errors) and the path of the full log.
"""

import json
import logging
import os
import threading
import time
import warnings
from contextlib import redirect_stdout
from pathlib import Path
from typing import Callable, Optional, Tuple
from unittest import mock

from components.errors import ERROR_MARKER

LOG_FILE = "pipeline.log"


class PipelineFailed(Exception):
    pass


def run_locally(pipeline: Callable, arguments: dict, run_dir: Path, progress: bool = True) -> None:
    from kfp import local

    # Artifacts land in the run directory, not in a pipeline_root relative to the cwd.
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(run_dir / "kfp"),
               raise_on_error=True)
    log_path = run_dir / LOG_FILE
    watcher = ProgressWatcher(run_dir) if progress else None
    # Each task copies its code into a fresh temp dir; keep those with the run, not in /tmp.
    task_tmp = run_dir / "kfp" / "tmp"
    task_tmp.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log, redirect_stdout(log), warnings.catch_warnings(), \
            mock.patch.dict(os.environ, {"TMPDIR": str(task_tmp)}):
        # Our image name has no "python" in it; the local runner uses this interpreter anyway.
        warnings.filterwarnings("ignore", message=".*non-Python base image.*")
        # Cluster-only task settings (resources, GPUs, caching) are carried in the YAML but not
        # used here; kfp says so for every task.
        warnings.filterwarnings("ignore", message=".*have no effect in the current local runner.*")
        log.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} {json.dumps(sorted(arguments))}\n")
        log.flush()
        if watcher:
            watcher.start()
        root_handlers = logging.getLogger().handlers[:]
        try:
            pipeline(**arguments)
        except RuntimeError as exc:
            log.flush()
            raise PipelineFailed(failure_line(log_path) or f"{exc}; see {log_path}") from None
        finally:
            if watcher:
                watcher.stop()
            # kfp logs its last line with logging.info outside its own logging context, which
            # makes logging install a root handler on the stderr of that moment; a later log
            # line would go to a stream that may be gone (seen as "--- Logging error ---").
            logging.getLogger().handlers[:] = root_handlers


def failure_line(log_path: Path) -> Optional[str]:
    """The last one-line user error a step printed, if any."""
    found = None
    with open(log_path) as f:
        for line in f:
            if ERROR_MARKER in line:
                found = line.split(ERROR_MARKER, 1)[1].strip()
    return found


class ProgressWatcher:
    """A tqdm bar in this process that follows the training run in progress through its
    metrics.jsonl: the run directory's own, or each of a study's runs (runs/*/) in turn."""

    def __init__(self, run_dir: Path, interval_s: float = 0.2):
        self.run_dir, self.interval_s = run_dir, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    @staticmethod
    def _planned_steps(run_dir: Path) -> Optional[int]:
        """The run's planned steps while it is training; None before and after."""
        try:
            summary = json.loads((run_dir / "summary.json").read_text())
        except (OSError, ValueError):
            return None
        return summary.get("planned_steps") if summary.get("status") == "running" else None

    def _training_now(self) -> Optional[Tuple[Path, int]]:
        for run_dir in [self.run_dir, *sorted((self.run_dir / "runs").glob("*/"))]:
            total = self._planned_steps(run_dir)
            if total is not None and (run_dir / "metrics.jsonl").exists():
                return run_dir, total
        return None

    def _follow(self) -> None:
        import sys

        from tqdm import tqdm

        bar, run_dir, offset = None, None, 0
        while True:
            stopping = self._stop.wait(self.interval_s)
            if bar is not None and self._planned_steps(run_dir) is None:  # that run has finished
                self._advance(bar, run_dir / "metrics.jsonl", offset)
                bar.close()
                bar = None
            if bar is None and (found := self._training_now()):
                run_dir, total = found
                desc = "train" if run_dir == self.run_dir else run_dir.name
                bar = tqdm(total=total, unit="step", desc=desc, file=sys.stderr, dynamic_ncols=True,
                           disable=None)  # no bar when stderr is not a terminal (CI logs)
                offset = 0
            if bar is not None:
                offset = self._advance(bar, run_dir / "metrics.jsonl", offset)
            if stopping:
                if bar is not None:
                    bar.close()
                return

    @staticmethod
    def _advance(bar, path: Path, offset: int) -> int:
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                chunk = f.read()
        except OSError:
            return offset
        complete = chunk[:chunk.rfind(b"\n") + 1]  # a row still being written waits for the next poll
        postfix = {}
        for line in complete.decode().splitlines():
            row = json.loads(line)
            if "train/loss" in row:
                postfix["loss"] = f"{row['train/loss']:.4f}"
            for key, value in row.items():
                if key.startswith("val/") and isinstance(value, float):
                    postfix[key] = f"{value:.4f}"
            step = row["step"]
            if step > bar.n:
                bar.update(step - bar.n)
        if postfix:
            bar.set_postfix(postfix, refresh=True)
        return offset + len(complete)
