"""Training across 2 processes under the real launcher (torchrun, gloo on CPU): the same update as
one process at the same effective batch, disjoint shards, out-of-memory back-off, stopping and
SIGTERM agreed by every rank, rank-0-only writes, resume (with the same world size and with another).

One torchrun launch runs every job (tests/ddp_worker.py); the one-process references and the
errors run in this process."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from components import distributed, early_stopping, models, plan, storage, training
from components.errors import ConfigError
from conftest import config

STEPS = 30  # digits: 19 steps of 64 per epoch, so the runs cross an epoch boundary
SAME = {"max_steps": STEPS, "optimizer": "sgd", "batch_size": 64, "micro_batch_size": 16}
JOBS = {
    "same": {"train": {"max_steps": STEPS, "checkpoint_every_steps": 10}, "eval": {"every_steps": 10}},
    "oom": {"train": {"max_steps": STEPS}, "eval": {"every_steps": 10}, "oom_at_step": 5},
    "patience": {"train": {"max_steps": STEPS}, "eval": {"every_steps": 2, "patience": 1, "min_delta": 0.5}},
    "diverge": {"train": {"max_steps": STEPS, "lr": 1e4}, "eval": {"every_steps": 10}},
    "resume": {"train": {"max_steps": STEPS}, "eval": {"every_steps": 10}, "sigterm_at_step": 12, "resume": True},
    "to_one": {"train": {"max_steps": STEPS}, "eval": {"every_steps": 10}, "sigterm_at_step": 12},  # resumed here
    "to_two": {"train": {"max_steps": STEPS}, "eval": {"every_steps": 10}},  # resumes the fixture's 1-process run
    "bf16": {"train": {"max_steps": STEPS, "precision": "bf16"}, "eval": {"every_steps": 10}},
    "no_accumulation": {"train": {"max_steps": STEPS, "micro_batch_size": 32}, "eval": {"every_steps": 10}},
}
INTERRUPTED = 12  # the step the runs that change world size stop at
WORKER = Path(__file__).with_name("ddp_worker.py")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, digits):
    """Both ranks' results of every job, from one launch of 2 processes; first a one-process run
    stopped (Ctrl-C) after step 12, which the to_two job resumes on 2 ranks."""
    base = tmp_path_factory.mktemp("ddp")
    one_indices = interrupted_one_process(digits, base / "runs" / "to_two")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "WANDB_MODE": "disabled",
           "PYTHONPATH": str(WORKER.parent.parent)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(WORKER), str(base), str(base / "runs"), json.dumps(JOBS)]
    # the timeout is the no-deadlock check: a rank left waiting in a collective never returns. On a
    # timeout torchrun gets SIGTERM, which it passes on to its workers (each in a session of its
    # own: killing torchrun outright left them waiting in gloo after the test), then SIGKILL
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            proc.communicate(timeout=45)  # torchrun waits up to 30 s for its workers, then kills them
        finally:
            proc.kill()
        raise
    assert proc.returncode == 0, stderr[-3000:]
    out = [torch.load(base / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    return {"base": base, "results": [o["results"] for o in out], "writes": [o["writes"] for o in out],
            "one_process_indices": one_indices}


def interrupted_one_process(digits, run_dir):
    """One process at 16 x 4, stopped by Ctrl-C after step INTERRUPTED; each step's examples."""
    cfg = config(train={**SAME}, eval={"every_steps": 10})
    torch.manual_seed(cfg.train.seed)
    model = models.build_model(cfg.model, digits.input_shape, digits.output_dim)
    indices = []

    def on_step(step):
        indices.append(trainer.indices.tolist())
        if step == INTERRUPTED:
            raise KeyboardInterrupt

    trainer = training.Trainer(model, digits, cfg, run_dir, progress=False, on_step=on_step)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    return indices


def one_process(digits, run_dir=None, accumulation=4, **train):
    """The reference: one process at the same effective batch, 64 (micro 16 x accumulation 4 unless
    `train` sets another micro-batch)."""
    cfg = config(train={**SAME, **train}, eval={"every_steps": 10})
    torch.manual_seed(cfg.train.seed)
    model = models.build_model(cfg.model, digits.input_shape, digits.output_dim)
    result = training.fit(model, digits, cfg, run_dir, progress=False)
    assert result.accumulation_steps == accumulation
    return torch.cat([p.detach().flatten() for p in model.parameters()]), result


def losses(path):
    return [r["train/loss"] for r in storage.read_jsonl(path) if "train/loss" in r]


def test_two_processes_train_to_the_same_weights_and_losses_as_one(ranks, digits, tmp_path):
    reference, result = one_process(digits, tmp_path)
    r0, r1 = (r["same"] for r in ranks["results"])
    assert r0["result"]["accumulation_steps"] == 2 and r0["result"]["world_size"] == 2
    torch.testing.assert_close(r0["params"], r1["params"], rtol=0, atol=0)  # the ranks never part
    torch.testing.assert_close(r0["params"], reference, rtol=1e-5, atol=1e-6)
    metrics = ranks["base"] / "runs" / "same" / training.METRICS
    assert losses(metrics) == pytest.approx(losses(tmp_path / training.METRICS), rel=1e-5)
    assert r0["result"]["samples_seen"] == STEPS * 64 == result.samples_seen
    assert [r["samples_seen"] for r in storage.read_jsonl(metrics) if "train/loss" in r] == [
        64 * s for s in range(1, STEPS + 1)]
    assert r0["noise"] is not None and 1 < r0["noise"] < 10_000 and r0["noise"] == r1["noise"]


def test_with_one_micro_batch_per_rank_two_processes_train_as_one_does(ranks, digits):
    """Accumulation 1 on each rank (64 = 32 x 1 x 2): the all-reduce alone makes the big batch."""
    r0, r1 = (r["no_accumulation"] for r in ranks["results"])
    assert r0["result"]["accumulation_steps"] == 1 and r0["result"]["micro_batch_size"] == 32
    torch.testing.assert_close(r0["params"], r1["params"], rtol=0, atol=0)
    reference, _ = one_process(digits, accumulation=2, micro_batch_size=32)
    torch.testing.assert_close(r0["params"], reference, rtol=1e-5, atol=1e-6)
    assert r0["noise"] is not None and r0["noise"] == r1["noise"]  # measured on split shards, agreed


def test_only_rank_0_writes_metrics_and_checkpoints(ranks):
    w0, w1 = ranks["writes"]
    assert w1 == []
    same = str(ranks["base"] / "runs" / "same")
    assert [kind for kind, path in w0 if path.startswith(same)] == ["metrics"] + ["checkpoint"] * 4  # 10, 20, 30, end
    assert len(storage.read_jsonl(Path(same) / training.METRICS)) == STEPS + 3  # each row once


def test_each_window_is_split_into_disjoint_shards_that_cover_it(ranks, digits):
    shards = [r["same"]["indices"] for r in ranks["results"]]
    n_train = len(digits.split("train")[0])
    steps_per_epoch = n_train // 64
    for step in range(STEPS):
        epoch, window = divmod(step, steps_per_epoch)
        order = plan.epoch_order(0, epoch, n_train)[window * 64:(window + 1) * 64].tolist()
        assert len(shards[0][step]) == len(shards[1][step]) == 32
        assert not set(shards[0][step]) & set(shards[1][step])
        assert shards[0][step] + shards[1][step] == order


def test_out_of_memory_on_one_rank_halves_the_micro_batch_on_both(ranks):
    (o0, o1), same = (r["oom"] for r in ranks["results"]), ranks["results"][0]["same"]
    assert o0["oom_events"] == o1["oom_events"] == [{"step": 5, "from": 16, "to": 8}]
    assert o0["result"]["micro_batch_size"] == o1["result"]["micro_batch_size"] == 8
    assert o0["result"]["accumulation_steps"] == 4 and o0["step"] == o1["step"] == STEPS
    torch.testing.assert_close(o0["params"], o1["params"], rtol=0, atol=0)
    torch.testing.assert_close(o0["params"], same["params"], rtol=1e-5, atol=1e-6)


def test_every_rank_stops_at_the_same_step(ranks):
    for job, reason in (("patience", early_stopping.PATIENCE), ("diverge", early_stopping.NON_FINITE)):
        r0, r1 = (r[job] for r in ranks["results"])
        assert r0["result"]["stop_reason"] == r1["result"]["stop_reason"] == reason
        assert r0["step"] == r1["step"] < STEPS


def test_sigterm_on_one_rank_stops_both_and_the_resumed_run_ends_where_an_uninterrupted_one_does(ranks):
    (r0, r1), same = (r["resume"] for r in ranks["results"]), ranks["results"][0]["same"]
    assert "after step 12" in r0["terminated"] and "after step 12" in r1["terminated"]
    resumed = [r["resume/resumed"] for r in ranks["results"]]
    assert resumed[0]["result"]["resumed_from_step"] == 12 and resumed[0]["step"] == STEPS
    assert resumed[0]["indices"] == same["indices"][12:]  # the shards continue where they stopped
    torch.testing.assert_close(resumed[0]["params"], resumed[1]["params"], rtol=0, atol=0)
    torch.testing.assert_close(resumed[0]["params"], same["params"], rtol=1e-6, atol=1e-7)
    assert len(torch.load(ranks["base"] / "runs" / "resume" / training.CHECKPOINT,
                          weights_only=False)["rng"]) == 2  # one random state per rank


def assert_each_epoch_covers_its_windows_once(steps, n_train):
    """`steps`: every step's examples (all ranks' shards together), from step 1 on."""
    per_epoch = n_train // 64
    for epoch in range(0, len(steps), per_epoch):
        seen = [i for step in steps[epoch:epoch + per_epoch] for i in step]
        windows = len(steps[epoch:epoch + per_epoch])
        assert len(seen) == len(set(seen)) == windows * 64  # no example twice, none lost
        assert sorted(seen) == sorted(plan.epoch_order(0, epoch // per_epoch, n_train)[:windows * 64].tolist())


def world_size_events(run_dir):
    return [r for r in storage.read_jsonl(run_dir / training.METRICS) if r.get("event") == "world_size_changed"]


def test_a_two_process_checkpoint_resumes_in_one_process_at_twice_the_accumulation(ranks, digits, tmp_path):
    shutil.copytree(ranks["base"] / "runs" / "to_one", tmp_path / "run")
    r0, r1 = (r["to_one"] for r in ranks["results"])
    assert "after step 12" in r0["terminated"] and r0["step"] == INTERRUPTED
    cfg = config(train={**SAME}, eval={"every_steps": 10})
    torch.manual_seed(cfg.train.seed)
    model = models.build_model(cfg.model, digits.input_shape, digits.output_dim)
    indices = []
    trainer = training.Trainer(model, digits, cfg, tmp_path / "run", progress=False,
                               on_step=lambda step: indices.append(trainer.indices.tolist()))
    result = trainer.fit()
    assert (result.resumed_from_step, result.optimizer_steps) == (INTERRUPTED, STEPS)
    assert (result.world_size, result.micro_batch_size, result.accumulation_steps) == (1, 16, 4)  # 2 x 16 x 2 before
    assert result.samples_seen == STEPS * 64
    reference = ranks["results"][0]["same"]["params"]  # the uninterrupted 2-process run
    torch.testing.assert_close(torch.cat([p.detach().flatten() for p in model.parameters()]), reference,
                               rtol=1e-5, atol=1e-6)
    assert [(e["step"], e["from"], e["to"], e["micro_batch_size"], e["accumulation_steps"])
            for e in world_size_events(tmp_path / "run")] == [(INTERRUPTED, 2, 1, 16, 4)]
    steps = [a + b for a, b in zip(r0["indices"], r1["indices"])] + indices
    assert len(steps) == STEPS
    assert_each_epoch_covers_its_windows_once(steps, len(digits.split("train")[0]))


def test_a_one_process_checkpoint_resumes_on_two_ranks(ranks, digits):
    r0, r1 = (r["to_two"] for r in ranks["results"])
    assert r0["result"]["resumed_from_step"] == r1["result"]["resumed_from_step"] == INTERRUPTED
    assert (r0["result"]["world_size"], r0["result"]["accumulation_steps"], r0["step"]) == (2, 2, STEPS)
    torch.testing.assert_close(r0["params"], r1["params"], rtol=0, atol=0)
    torch.testing.assert_close(r0["params"], ranks["results"][0]["same"]["params"], rtol=1e-5, atol=1e-6)
    assert [(e["from"], e["to"], e["accumulation_steps"]) for e in
            world_size_events(ranks["base"] / "runs" / "to_two")] == [(1, 2, 2)]
    steps = ranks["one_process_indices"] + [a + b for a, b in zip(r0["indices"], r1["indices"])]
    assert len(steps) == STEPS
    assert_each_epoch_covers_its_windows_once(steps, len(digits.split("train")[0]))


def test_a_world_size_that_cannot_keep_the_effective_batch_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"^train.batch_size: effective batch 64 is not divisible by micro-batch x "
                                          r"world size = 48$"):
        config(train={**SAME, "nproc": 3})


def test_a_launcher_world_size_other_than_the_configs_is_a_clear_error(digits, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    cfg = config(train={**SAME})
    model = models.build_model(cfg.model, digits.input_shape, digits.output_dim)
    with pytest.raises(ConfigError, match=r"^world size: the launcher started 2 processes \(WORLD_SIZE=2\) but the "
                                          r"config's world size is 1; launch as many as the config says$"):
        training.Trainer(model, digits, cfg, progress=False)
    assert distributed.start(1, torch.device("cpu"), environ={}) == distributed.Runtime()  # no launcher: one rank


def test_bf16_across_ranks_trains_as_one_bf16_process_does(ranks, digits):
    r0, r1 = (r["bf16"] for r in ranks["results"])
    torch.testing.assert_close(r0["params"], r1["params"], rtol=0, atol=0)
    reference, _ = one_process(digits, precision="bf16")
    torch.testing.assert_close(r0["params"], reference, rtol=1e-5, atol=1e-6)
    assert (reference - ranks["results"][0]["same"]["params"]).abs().max() > 1e-3  # and bf16 is not fp32
