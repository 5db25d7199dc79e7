"""One rank of tests/test_distributed.py, started by torchrun: trains digits in each of the jobs
the test names and saves what it checks to <out>/rank<r>.pt (the test reads the files).

    python -m torch.distributed.run --standalone --nproc-per-node=2 tests/ddp_worker.py OUT RUNS JOBS_JSON

JOBS_JSON: {name: {"train": {...}, "eval": {...}, "oom_at_step": k, "sigterm_at_step": k, "resume": true}}
A job whose run directory already holds a checkpoint resumes from it.
"""

import faulthandler
import json
import os
import signal
import sys
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from components import config as config_module, datasets, distributed, models, storage, training  # noqa: E402

faulthandler.register(signal.SIGUSR1)  # `kill -USR1 PID` prints where a hung rank waits
WORLD = int(os.environ["WORLD_SIZE"])
RANK = int(os.environ["RANK"])

writes = []  # (what, path) this rank wrote into a run directory
real_save_torch, real_writer_init = storage.save_torch, storage.JsonlWriter.__init__
storage.save_torch = lambda obj, path, *a, **k: writes.append(("checkpoint", str(path))) or real_save_torch(obj, path,
                                                                                                          *a, **k)


def writer_init(self, path, *a, **k):
    writes.append(("metrics", str(path)))
    real_writer_init(self, path, *a, **k)


storage.JsonlWriter.__init__ = writer_init


class OutOfMemoryOnce(torch.nn.Module):
    """An injected memory limit on this rank from its `at_call`-th training forward on: micro-batches
    larger than `limit` raise the CUDA out-of-memory error type (as tests/test_training.py does)."""

    def __init__(self, inner, at_call, limit):
        super().__init__()
        self.inner, self.at_call, self.limit, self.calls = inner, at_call, limit, 0

    def forward(self, x):
        if self.training:
            self.calls += 1
            if self.calls >= self.at_call and len(x) > self.limit:
                raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {len(x)} samples")
        return self.inner(x)


def config(job):
    raw = config_module.Config().to_dict()
    raw["train"].update({"batch_size": 64, "micro_batch_size": 16, "optimizer": "sgd",
                         "checkpoint_every_steps": None, "nproc": WORLD, **job.get("train", {})})
    raw["eval"].update(job.get("eval", {}))
    raw["tracking"]["mode"] = "disabled"
    return config_module.parse_config(raw)


def run(job, data, run_dir):
    cfg = config(job)
    torch.manual_seed(cfg.train.seed)
    inner = models.build_model(cfg.model, data.input_shape, data.output_dim)
    model = inner
    if job.get("oom_at_step") and RANK == 1:  # micro-steps per step: the shard over the micro-batch
        per_step = cfg.train.batch_size // WORLD // cfg.train.micro_batch_size
        model = OutOfMemoryOnce(inner, (job["oom_at_step"] - 1) * per_step + 1, cfg.train.micro_batch_size // 2)
    indices = []

    def on_step(step):
        indices.append(trainer.indices.tolist())
        if step == job.get("sigterm_at_step") and RANK == 1:  # the signal reaches one rank only
            os.kill(os.getpid(), signal.SIGTERM)

    out = {}
    trainer = training.Trainer(model, data, cfg, run_dir, progress=False, on_step=on_step)
    try:
        out["result"] = trainer.fit().to_dict()
    except training.Terminated as exc:
        out["terminated"] = str(exc)
    out.update(params=torch.cat([p.detach().flatten() for p in inner.parameters()]), indices=indices,
               step=trainer.state.step, oom_events=trainer.state.oom_events, noise=trainer.state.noise.value)
    return out


def main(out_dir, runs_dir, jobs):
    data = datasets.build(config_module.Config().data)
    results = {}
    for name, job in jobs.items():
        results[name] = run(job, data, Path(runs_dir) / name if job.get("run_dir", True) else None)
        if job.get("resume"):
            results[name + "/resumed"] = run({**job, "sigterm_at_step": None}, data, Path(runs_dir) / name)
    torch.save({"results": results, "writes": writes}, Path(out_dir) / f"rank{RANK}.pt")
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]))
