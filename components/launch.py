"""The train step across processes on one machine: it runs its training again under torchrun.

`train.run` (the pipeline's train step, `python -m components.train`) calls `train_across_ranks`
when the config's world size is above 1 and no launcher started this process (no WORLD_SIZE in
the environment). It writes the job to a scratch directory and starts

    python -m torch.distributed.run --standalone --nproc-per-node=N -m components.launch JOB

in a session of its own. Every rank runs `train.run` on the same inputs (only rank 0 writes:
components/train.py) and leaves its outcome, or its one-line error, in JOB/rank<r>.json; this
process then returns rank 0's outcome, or raises the error, as if it had trained itself: the
pipeline's train step sees the same model.pt, outcome and metrics as with one process.

Threads: each rank gets the usable CPUs / N (as OMP_NUM_THREADS, which components/cpu.py reads;
an explicit train.cpu_threads still wins): N processes with all the threads each wait on each
other at every op (GUIDE: up to 100x slower steps).

Signals: Ctrl-C or SIGTERM here reaches the ranks as SIGTERM, sent to them directly (their pids
are in JOB): the trainer finishes the step, the ranks agree, save a checkpoint and stop
(components/training.py), and this process raises KeyboardInterrupt or training.Terminated as one
process would. torchrun itself is not signalled: it would pass the same signal on (SIGINT stops
ranks mid-step, without a checkpoint) and print its own traceback. A second signal kills them.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from components import errors, storage
from components.config import Config
from components.cpu import usable_cpus
from components.errors import ConfigError, UserInputError
from components.signals import handling
from components.training import Terminated

JOB_FILE = "job.json"
STOP_GRACE_S = 60.0  # after a signal: how long the ranks get to finish the step and checkpoint
POLL_S = 0.2
_ERRORS = {cls.__name__: cls for cls in (ConfigError, errors.DataError, errors.StorageError, UserInputError)}


def under_launcher(environ=os.environ) -> bool:
    """This process is one rank of several (torchrun, a Kubeflow TrainJob set WORLD_SIZE)."""
    return "WORLD_SIZE" in environ


def threads_per_rank(cfg: Config, environ=os.environ) -> int:
    """The usable CPUs shared out among this machine's ranks (at least 1 each), and no more than
    OMP_NUM_THREADS when that is set."""
    threads = max(1, usable_cpus() // cfg.nproc_per_node)
    omp = environ.get("OMP_NUM_THREADS", "")
    return min(threads, int(omp)) if omp.isdigit() and int(omp) > 0 else threads


def command(cfg: Config, job_dir: Path) -> List[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={cfg.nproc_per_node}",
            "-m", "components.launch", str(job_dir)]


def environment(cfg: Config, environ=os.environ) -> Dict[str, str]:
    root = str(Path(__file__).resolve().parent.parent)  # this package, importable by the ranks
    path = os.pathsep.join(p for p in (root, environ.get("PYTHONPATH")) if p)
    env = {**environ, "OMP_NUM_THREADS": str(threads_per_rank(cfg, environ)), "PYTHONPATH": path}
    if sys.platform.startswith("linux"):  # one machine: the ranks meet on loopback, whatever the hostname resolves to
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    return env


def check_launchable(cfg: Config) -> None:
    """What this launcher cannot do, said before any process starts."""
    if cfg.nodes > 1:
        raise ConfigError(f"platform.nodes: {cfg.nodes} nodes train in a Kubeflow Trainer TrainJob "
                          "(components/trainjob.py), not in one train step")
    have = _cuda_count() if cfg.train.device in ("cuda", "auto") else 0
    if cfg.train.device == "cuda" or have:
        if have < cfg.nproc_per_node:
            raise ConfigError(f"train.nproc: {cfg.nproc_per_node} processes need one GPU each; "
                              f"{have} visible here")


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def train_across_ranks(cfg: Config, config: dict, dataset_path: str, model_out: str, store_uri: Optional[str],
                       progress: Optional[bool]) -> dict:
    """Run `train.run` on every rank under torchrun; rank 0's outcome (see the module's doc)."""
    return across_ranks(cfg, {"config": config, "dataset": str(dataset_path), "model_out": str(model_out),
                              "store": store_uri, "progress": progress})


def across_ranks(cfg: Config, job: dict) -> dict:
    """`job` on every rank under torchrun: train.run, or with "task": "scaling" the probe's burst
    of cross-rank steps (components/scaling.py); rank 0's outcome."""
    check_launchable(cfg)
    with storage.scratch_dir(f"launch-{cfg.run_id or 'run'}-") as job_dir:
        storage.write_json(job_dir / JOB_FILE, job)
        proc = subprocess.Popen(command(cfg, job_dir), env=environment(cfg), start_new_session=True)
        code, signals = _wait(proc, job_dir)
        results = [_read(job_dir / f"rank{r}.json") for r in range(cfg.nproc_per_node)]
    terminated = next((r["terminated"] for r in results if r and "terminated" in r), None)
    if signals and signals[0] == signal.SIGINT:
        raise KeyboardInterrupt
    if signals or terminated:
        raise Terminated(terminated or "SIGTERM: stopped before the ranks could checkpoint")
    failed = [r for r in results if r and "error" in r]
    if failed:  # rank 0's when it has one: the ranks usually fail alike
        raise _ERRORS.get(failed[0]["kind"], UserInputError)(failed[0]["error"])
    if code != 0 or not results[0] or "outcome" not in results[0]:
        what = "the probe's scaling burst" if job.get("task") == "scaling" else "train"
        raise RuntimeError(f"{what}: torchrun exited with status {code}; the ranks' tracebacks are above")
    return results[0]["outcome"]


def _read(path: Path) -> Optional[dict]:
    try:
        return storage.read_json(path)
    except (OSError, ValueError):
        return None


def _rank_pids(job_dir: Path) -> List[int]:
    pids = []
    for path in job_dir.glob("pid*"):
        try:
            pids.append(int(path.read_text()))
        except (OSError, ValueError):
            continue
    return pids


def _wait(proc: subprocess.Popen, job_dir: Path) -> tuple:
    """torchrun's exit status and the signals that arrived meanwhile (each passed on as SIGTERM)."""
    signals: List[int] = []
    signalled = set()

    def kill_all():
        for pid in _rank_pids(job_dir) + [proc.pid]:
            _kill(pid, signal.SIGKILL)

    def on_signal(signum, frame):
        signals.append(signum)
        if len(signals) > 1:  # a second one: stop now
            kill_all()

    with handling((signal.SIGINT, signal.SIGTERM), on_signal):
        deadline = None
        while True:
            try:
                return proc.wait(timeout=POLL_S), signals
            except subprocess.TimeoutExpired:
                pass
            if signals:
                deadline = deadline or time.monotonic() + STOP_GRACE_S
                for pid in set(_rank_pids(job_dir)) - signalled:  # ranks still starting get it once they are up
                    _kill(pid, signal.SIGTERM)
                    signalled.add(pid)
                if time.monotonic() > deadline:
                    kill_all()


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def main(argv=None) -> int:
    """One rank: train.run on the job, its result into JOB/rank<r>.json."""
    from components import distributed, train

    job_dir = Path((argv or sys.argv[1:])[0])
    rank = int(os.environ["RANK"])
    storage.write_text(job_dir / f"pid{rank}", str(os.getpid()))
    job = storage.read_json(job_dir / JOB_FILE)
    code, result = 0, {}
    try:
        if job.get("task") == "scaling":
            from components import scaling

            outcome = scaling.rank_burst(job)
        else:
            outcome = train.run(job["config"], job["dataset"], job["model_out"], job["store"], job["progress"])
        result = {"outcome": outcome} if rank == 0 else {"done": True}
    except Terminated as exc:  # every rank stopped at the same step with a checkpoint
        result = {"terminated": str(exc)}
    except UserInputError as exc:  # said once, by the launching process; exit non-zero so torchrun stops the others
        result, code = {"error": str(exc), "kind": type(exc).__name__}, 2
    finally:
        storage.write_json(job_dir / f"rank{rank}.json", result)
        distributed.shutdown()
    return code


if __name__ == "__main__":
    sys.exit(main())
