"""Scaling across ranks, measured instead of assumed: the probe's short burst of real cross-rank
steps at its chosen micro-batch and accumulation.

The probe's throughput ladder times one process (components/probe.py). N ranks are not N times as
fast: every step adds the all-reduce of the gradients, and ranks on one machine share its CPUs
(each gets usable CPUs / N threads: components/launch.py). So with world size > 1 the probe runs
`measure`: TIME_S seconds of steps under torchrun, through the launcher the train step uses
(components/launch.py, job task "scaling"), each step the trainer's own cross-rank step
(components/distributed_step.py) plus the optimizer's update. It records the samples/s of all
ranks together, one process's samples/s at the same micro-batch (the ladder's), and their ratio
per rank, the scaling efficiency = measured / (world size x one process's). The probe's
recommendation (samples/s, goodput, the predicted time) uses the measured number.

Where this probe's pod cannot start the ranks (several nodes: a Kubeflow TrainJob's; fewer GPUs
here than ranks) the efficiency is not measured: 1 is assumed, and probe.json says why.
"""

import math
import time
from pathlib import Path
from typing import Dict, Optional

import torch

from components import cpu, datasets, distributed, launch, metrics, models, plan, throughput
from components.config import Config, parse_config
from components.distributed_step import micro_steps_across_ranks
from components.errors import ConfigError
from components.precision import Precision

TIME_S = 1.0  # timed steps per burst, after the warm-up (torchrun's start costs a few seconds more)
WARMUP_STEPS = 3  # the first steps pay for allocation and gloo/NCCL's first collectives
MIN_STEPS, MAX_STEPS = 5, 5000


def measure(cfg: Config, config: dict, dataset_path: str, micro: int, accumulation: int,
            single_samples_per_s: float, time_s: Optional[float] = None) -> Dict:
    """The scaling record for probe.json: measured samples/s of cfg.world_size ranks at `micro` x
    `accumulation` per rank, beside one process's `single_samples_per_s`, and the efficiency."""
    world = cfg.world_size
    record = {"world_size": world, "micro_batch_size": micro, "accumulation_steps": accumulation,
              "single_process_samples_per_s": single_samples_per_s}
    try:
        launch.check_launchable(cfg)
    except ConfigError as exc:
        return {**record, "measured": False, "efficiency": 1.0, "samples_per_s": single_samples_per_s * world,
                "note": f"not measured here ({exc}); linear scaling assumed"}
    job = {"task": "scaling", "config": config, "dataset": str(dataset_path), "micro_batch_size": micro,
           "accumulation_steps": accumulation, "time_s": TIME_S if time_s is None else time_s}
    burst = launch.across_ranks(cfg, job)
    efficiency = burst["samples_per_s"] / (world * single_samples_per_s)
    return {**record, "measured": True, "efficiency": efficiency, **burst}


def reasoning(record: Dict) -> str:
    """One line for probe.json's reasoning."""
    if not record["measured"]:
        return f"scaling to {record['world_size']} ranks {record['note']}"
    return (f"scaling measured: {record['world_size']} ranks at micro-batch {record['micro_batch_size']} x "
            f"{record['accumulation_steps']} ran {record['samples_per_s']:,.0f} +- {record['spread']:,.0f} samples/s, "
            f"{record['efficiency']:.2f} x {record['world_size']} x one process's "
            f"{record['single_process_samples_per_s']:,.0f} ({record['steps']} steps under torchrun)")


def rank_burst(job: dict) -> Dict:
    """One rank's part of the burst (components/launch.py runs it on every rank): WARMUP_STEPS,
    then steps for about job["time_s"]; rank 0's step count is every rank's (each step is a
    collective). Returns samples/s of all ranks together (the median over steps, timed on this
    rank, with its spread), the steps timed, and whether the ranks' weights agree at the end."""
    cfg = parse_config(job["config"])
    cpu.configure_threads(cfg.train)
    data = datasets.load(Path(job["dataset"]))
    dist = distributed.start(cfg.world_size, plan.resolve_device(cfg.train.device))
    device = dist.device
    x, y = (torch.as_tensor(a).to(device) for a in data.split("train"))
    torch.manual_seed(cfg.train.seed)
    model = models.build_model(cfg.model, data.input_shape, data.output_dim).to(device).train()
    dist.broadcast_tensors(list(model.state_dict().values()))
    params = list(model.parameters())
    optimizer = plan.make_optimizer(model, cfg.train, cfg.train.lr)
    precision = Precision(cfg.train.precision, device) if cfg.train.precision != "fp32" else None
    loss_fn = metrics.loss_fn(data.task)
    micro = job["micro_batch_size"]
    shard = micro * job["accumulation_steps"]
    batch = shard * dist.world_size
    n = len(x)
    order = plan.epoch_order(cfg.train.seed, 0, n).to(device)
    windows = n // batch
    # as the trainer cuts a window: this rank's shard of it (a batch above the split repeats rows)
    shards = [order[w * batch + dist.rank * shard:][:shard] for w in range(windows)] or [
        order[(torch.arange(shard, device=device) + dist.rank * shard) % n]]

    def step(i: int) -> None:
        losses = micro_steps_across_ranks(dist, params, model, loss_fn, x, y, shards[i % len(shards)], micro,
                                          precision)
        if precision is None:
            optimizer.step()
        else:
            precision.step(optimizer)
        optimizer.zero_grad(set_to_none=True)
        losses[0].item()

    for i in range(WARMUP_STEPS):
        step(i)
    started = time.perf_counter()
    step(WARMUP_STEPS)
    one = time.perf_counter() - started
    steps = dist.broadcast(min(MAX_STEPS, max(MIN_STEPS, math.ceil(job["time_s"] / max(one, 1e-6)))))
    seconds = []
    for i in range(steps):
        started = time.perf_counter()
        step(WARMUP_STEPS + 1 + i)
        seconds.append(time.perf_counter() - started)
    timed = throughput.measurement(batch, throughput.Blocks(steps, seconds))  # one step a block
    weights = float(sum(p.detach().double().sum() for p in params))
    return {"samples_per_s": timed["samples_per_s"], "spread": timed["spread"], "steps": steps,
            "time_s": sum(seconds), "threads_per_rank": torch.get_num_threads(),
            "ranks_agree": len(set(dist.gather(weights))) == 1}
