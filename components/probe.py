"""Step: probe. Decides the micro-batch, the effective batch and so the accumulation for the
train step, when the config leaves them "auto", and writes the evidence to probe.json.

1. Memory fit: the largest micro-batch that fits the device with a margin (components/memory.py),
   counting the optimizer's state and, across ranks, the all-reduce's flat gradient buffer.
2. Gradient noise scale B_simple (components/noise_scale.py), after a short warm-up.
3. Throughput: samples per second on a geometric ladder of micro-batches up to the fit, each the
   median of timed blocks with its spread (components/throughput.py), after the threads are set
   (components/cpu.py) and warmed up.
4. Recommendation: the effective batch B maximizing goodput = throughput(B) / (1 + B/B_noise),
   i.e. minimizing time to a target when samples-to-target grow as 1 + B/B_noise
   (McCandlish et al. 2018); when the goodputs of smaller batches overlap the best's within the
   measured spread, the smallest of them. A close choice (another goodput within CLOSE of the
   best, or overlapping it) is made again after the rungs it hinges on are measured over 4x the
   passes (`hinges_on`, throughput.Ladder.settle);
   micro-batch = the fastest that fits and divides B;
   accumulation = B / (micro x world size); LR rescaled from train.base_batch_size by train.lr_scaling.
5. Across ranks (world size > 1): a short burst of real cross-rank steps at that choice under
   torchrun measures the scaling efficiency (components/scaling.py); the options' samples/s and
   goodput use it (one number, so the choice stands and the predicted pace is the measured one).

    python -m components.probe --config config.yaml --dataset dataset/ --out probe.json --run-dir runs/r1
"""

import argparse
import copy
import math
import os
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from components import (cpu, datasets, distributed, loop_pace, memory, metrics, models, noise_scale, plan, precision,
                        run_store, scaling, storage, throughput)
from components.config import (AUTO, Config, ProbeConfig, config_hash, for_dataset, largest_divisor_at_most,
                               load_config_file, parse_config, with_batch_sizes)
from components.errors import ConfigError, exit_on_user_error
from components.run_store import RunStore, join_uri
from components.tracking import Tracker

PROBE_FILE = "probe.json"
KNEE = 0.9  # throughput within 10% of the best counts as flat
# A choice whose runner-up's goodput is within 20% of the best's is made again after the rungs
# behind both are measured longer (hinges_on): on digits 64 vs 128 is 0.75-0.9, and a slow spell
# through one rung's measurement (20 ms) flipped it on a busy CPU
CLOSE = 0.8
throughput_at = throughput.throughput_at  # the study reads the ladder through it


def memory_budget(cfg: Config, device: torch.device) -> tuple:
    """Bytes a micro-step may use, and how that was decided (said in probe.json)."""
    explicit = cfg.probe.memory_budget_gb * 2**30 if cfg.probe.memory_budget_gb else None
    if device.type == "cuda":
        total = torch.cuda.mem_get_info(device)[1]
        if explicit and explicit < total:
            return int(explicit), f"probe.memory_budget_gb={cfg.probe.memory_budget_gb} (device has {total / 2**30:.1f} GiB)"
        return int(total), f"{torch.cuda.get_device_name(device)}: {total / 2**30:.1f} GiB, peak allocated memory measured per trial"
    if explicit:
        return int(explicit), (f"CPU: probe.memory_budget_gb={cfg.probe.memory_budget_gb}; a micro-step's need is "
                               "parameters, gradients, optimizer state, inputs and the activations autograd saves")
    # In a pod the node's RAM is not what this process may use: its cgroup's memory limit is.
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = cpu.memory_limit_bytes()
    if limit is not None and limit < ram:
        total, what = limit, f"the cgroup's memory limit ({limit / 2**30:.1f} GiB; the machine has {ram / 2**30:.1f})"
    else:
        total, what = ram, f"RAM ({ram / 2**30:.1f} GiB)"
    return int(total // 4), (f"CPU: a quarter of {what}; a micro-step's need is parameters, "
                             "gradients, optimizer state, inputs and the activations autograd saves")


def memory_fit(cfg: Config, model, loss_fn, x, y, device: torch.device, budget: int) -> tuple:
    """The largest micro-batch whose training step fits `budget` (memory.find_max_micro_batch), and
    the bytes counted on top of the trial's forward + backward: the optimizer's state (Adam's two
    moments, SGD's momentum) and, with world size > 1, each rank's all-reduce buffer (every
    gradient in one flat tensor: distributed.flat_buffer_bytes), so the recommended micro-batch
    leaves room for them. On CPU the trial counts them; on CUDA one buffer of their size stays
    allocated through the trials."""
    n_train = len(x)
    cap = min(n_train, cfg.probe.max_micro_batch_size)
    if cfg.train.batch_size != AUTO:
        cap = min(cap, cfg.train.batch_size // cfg.world_size)
    state_factor = {"sgd": 1.0 if cfg.train.momentum else 0.0, "adamw": 2.0}[cfg.train.optimizer]
    trainable = sum(p.nbytes for p in model.parameters() if p.requires_grad)
    held = {"optimizer_state_bytes": int(state_factor * trainable),
            "all_reduce_buffer_bytes": distributed.flat_buffer_bytes(model.parameters(), cfg.world_size)}
    if device.type == "cuda":
        def step(b: int) -> None:
            rows = torch.arange(b, device=device) % n_train
            loss_fn(model(x[rows]), y[rows]).backward()
            model.zero_grad(set_to_none=True)
        trial = memory.cuda_trial(step, device, held_bytes=sum(held.values()))
    else:
        trial = memory.cpu_trial(model, loss_fn, x, y, optimizer_state_factor=state_factor,
                                 held_bytes=held["all_reduce_buffer_bytes"])
    start_at = memory.first_probe_batch(model, loss_fn, x, y, cap) if device.type == "cuda" else 8
    try:
        fit = memory.find_max_micro_batch(trial, budget, cfg.probe.memory_margin, cap=cap, probe=start_at,
                                          on_trial=_print_trial)
    except memory.DoesNotFit as exc:
        raise ConfigError(f"probe: {exc}") from None
    if cfg.train.micro_batch_size != AUTO and cfg.train.micro_batch_size > fit.micro_batch:
        raise ConfigError(f"train.micro_batch_size: {cfg.train.micro_batch_size} does not fit the memory budget; "
                          f"the largest that fits is {fit.micro_batch}")
    return fit, held


def throughput_ladder(model, optimizer_factory, loss_fn, x, y, top: int, device: torch.device, *,
                      time_s: float = 0.02, remeasure: int = 2, timer: Optional[throughput.StepTimer] = None,
                      progress: bool = True) -> Dict:
    """Samples/s of full training steps at micro-batches 8, 16, ... up to `top` (and `top`), each
    the median of blocks timed for `time_s` seconds, with its spread; re-measured where the ladder
    is not monotone beyond the spread (components/throughput.py). Runs on one copy (the rungs
    are interleaved; one copy is what fits next to the model): the probed model is not trained.
    Returns {"ladder", "remeasured", "accepted", "timing"} (throughput.measure_ladder)."""
    trial_model = copy.deepcopy(model)
    optimizer = optimizer_factory(trial_model)

    def make_step(b: int) -> Callable[[], None]:
        # What the trainer's step does (components/training.py): gather the batch by index, forward,
        # backward, update, and one host sync for the loss. Leaving the gather and the sync out made
        # the study's measured pace 1.5x the probe's on the digits MLP (bench/study_timing.py).
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(b))
        rows = (order[:b] if b <= len(x) else torch.arange(b) % len(x)).to(device)

        def step() -> None:
            loss = loss_fn(trial_model(x[rows]), y[rows])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss.item()
        return step

    sizes = throughput.ladder_sizes(top)
    warm_up = make_step(sizes[-1])  # torch's thread pool wakes and the clock ramps up before the first rung
    deadline = time.perf_counter() + time_s
    warm_up()
    while time.perf_counter() < deadline:
        warm_up()
    del warm_up

    def on_rung(r: Dict) -> None:
        if progress:
            print(f"probe: throughput micro-batch {r['micro_batch_size']}: {r['samples_per_s']:,.0f} samples/s "
                  f"+- {r['spread']:,.0f}", flush=True)

    def on_remeasure(n: int, pairs: List, uncertain: List[int]) -> None:
        if progress:
            print(f"probe: throughput re-measuring ({_why_again(pairs, uncertain)}; round {n})", flush=True)

    # on an accelerator a block of one step would mostly time the sync: blocks of >= 1 ms there
    timer = timer or throughput.BlockTimer(time_s / throughput.PASSES,
                                           min_block_s=1e-3 if device.type == "cuda" else 50e-6)
    return throughput.measure_ladder(sizes, make_step, timer, remeasure, on_rung=on_rung, on_remeasure=on_remeasure)


def early_noise_scale(model: torch.nn.Module, optimizer_factory: Callable, loss_fn: Callable, x: torch.Tensor,
                      y: torch.Tensor, small: int, p: ProbeConfig, seed: int) -> noise_scale.NoiseScale:
    """B_simple early in training, on a copy of `model` (freed on return, before the ladder's copy):
    p.warmup_steps of training at batch `small`, then p.noise_batches big batches (small x
    p.noise_accumulation), one per training step, as a ratio of means over all of them.

    One a step: early in training B_simple swings 2-4x within tens of steps (SGD with momentum
    crossing a valley), so all the batches at one instant made it a draw of the seed: 62-196 on
    twelve seeds of one task, 81-563 on digits; spread over as many steps, 85-173 and 136-333
    (BENCHMARKS.md, noise-scale estimator)."""
    warm = copy.deepcopy(model)
    optimizer = optimizer_factory(warm)
    gen = torch.Generator().manual_seed(seed)

    def step() -> None:
        rows = torch.randint(0, len(x), (small,), generator=gen).to(x.device)
        loss_fn(warm(x[rows]), y[rows]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(p.warmup_steps):
        step()
    pairs = []
    for _ in range(p.noise_batches):
        pairs.append(noise_scale.batch_sq_norms(warm, loss_fn, x, y, small, p.noise_accumulation, 1, gen))
        step()
    return noise_scale.estimate(torch.cat([s for s, _ in pairs]), torch.cat([b for _, b in pairs]), small,
                                small * p.noise_accumulation, population=len(x))


def recommend(cfg: Config, fit: int, ladder: List[Dict], b_noise: float, n_train: int,
              scaling: float = 1.0) -> Dict:
    """The effective batch, micro-batch and accumulation that maximize goodput. Across ranks the
    samples/s are one process's (the ladder's) x world size x `scaling`, the efficiency the
    scaling burst measured (components/scaling.py; 1 until it has)."""
    t, world = cfg.train, cfg.world_size
    pace = world * scaling  # samples/s of all ranks per sample/s of one process
    largest = max(cfg.probe.min_batch_size, n_train // 8)  # keep at least ~8 steps per epoch
    if t.batch_size != AUTO:
        candidates = [t.batch_size]
    else:
        step = t.micro_batch_size * world if t.micro_batch_size != AUTO else world
        candidates = sorted({b for k in range(0, 24) for b in [2 ** k]
                             if cfg.probe.min_batch_size <= b <= largest and b % step == 0})
        if not candidates:
            candidates = [step * max(1, largest // step)]
    rungs = [r["micro_batch_size"] for r in ladder]
    options = []
    for batch in candidates:
        per_rank = batch // world
        if t.micro_batch_size != AUTO:
            micro = t.micro_batch_size
        else:  # the fastest measured micro-batch that divides the batch (accumulating the rest)
            fitting = {largest_divisor_at_most(per_rank, fit)} | {b for b in rungs if per_rank % b == 0}
            micro = max(fitting, key=lambda b: (throughput_at(ladder, b), b))
        samples_per_s = throughput_at(ladder, micro) * pace
        efficiency = 1.0 / (1.0 + batch / b_noise)  # relative samples-to-target: E_min / E(B)
        options.append({"effective_batch_size": batch, "micro_batch_size": micro,
                        "accumulation_steps": per_rank // micro, "samples_per_s": samples_per_s,
                        "statistical_efficiency": efficiency, "goodput": samples_per_s * efficiency,
                        # the spread of the measured throughput's median, carried through
                        "goodput_spread": throughput_at(ladder, micro, "spread") * pace * efficiency})
    best = max(options, key=lambda o: o["goodput"])
    # Goodputs that overlap the best's within the measured spread are not told apart by this
    # measurement: take the smallest such batch (fewer samples to the target, less memory).
    chosen = min((o for o in options
                  if o["goodput"] + o["goodput_spread"] >= best["goodput"] - best["goodput_spread"]),
                 key=lambda o: o["effective_batch_size"])
    note = None
    if chosen is not best:
        note = (f"goodput at batch {chosen['effective_batch_size']} ({_span(chosen)}) overlaps the best, batch "
                f"{best['effective_batch_size']} ({_span(best)}), within the measured spread: "
                f"the smaller batch {chosen['effective_batch_size']} is chosen")
    lr = plan.scaled_lr(t.lr, chosen["effective_batch_size"], t.base_batch_size, t.lr_scaling)
    return {**chosen, "world_size": world, "lr": lr, "options": options, "spread_note": note}


def hinges_on(choice: Dict, ladder: List[Dict]) -> List[int]:
    """The rungs a close choice rests on: those the samples/s of the chosen option, the best and
    every option within CLOSE of the best's goodput were read from; none when the best stands alone."""
    best = max(choice["options"], key=lambda o: o["goodput"])
    close = [o for o in choice["options"] if o["goodput"] >= CLOSE * best["goodput"]]
    if choice["effective_batch_size"] == best["effective_batch_size"] and len(close) == 1:
        return []
    return sorted({b for o in [choice, *close] for b in throughput.rungs_behind(ladder, o["micro_batch_size"])})


def _span(option: Dict) -> str:
    return f"{option['goodput']:,.0f} +- {option['goodput_spread']:,.0f}"


def decision(result: Dict) -> Dict:
    """The part of probe.json the later steps carry into the summary: what was chosen and why."""
    return {"recommendation": result["recommendation"], "b_simple": result["noise_scale"]["b_simple"],
            "b_simple_spread": result["noise_scale"]["spread"],
            "max_micro_batch_size": result["memory"]["micro_batch_size"], "device": result["device"],
            "throughput_ladder": result["throughput"]["ladder"], "cpu_threads": result.get("cpu_threads"),
            "scaling": result.get("scaling"), "loop": result["throughput"].get("loop"),
            "reasoning": result["reasoning"]}


def apply(config: dict, result: Dict) -> dict:
    """The config with the probe's batch sizes in place of 'auto'."""
    choice = result["recommendation"]
    return with_batch_sizes(config, choice["effective_batch_size"], choice["micro_batch_size"])


def run(config: dict, dataset_path: str, out: str, store=None,
        timer: Optional[throughput.StepTimer] = None) -> Dict:
    """Write probe.json to `out` and to the run's store (a RunStore or location; None:
    `<output_dir>/<run_id>` of the config). `timer` replaces the throughput ladder's clock (tests
    script the timings)."""
    data = datasets.load(Path(dataset_path))
    config = for_dataset(config, data.manifest)
    cfg = parse_config(config)
    store = run_store.open_run(config, store)
    identity = {"config_hash": config_hash(cfg), "data_version": data.data_version}
    # a resumed run keeps the decision its checkpoints were made with (its own, or resume_from's)
    for source in [store] + ([RunStore.open(cfg.resume_from, store.settings)] if cfg.resume_from else []):
        result = source.get_json(PROBE_FILE) if source.exists(PROBE_FILE) else {}
        if result and all(result.get(k) == v for k, v in identity.items()):
            storage.write_json(Path(out), result)
            if source is not store:
                store.put_file(Path(out), PROBE_FILE)
            print(f"probe: reusing {join_uri(source.uri, PROBE_FILE)}")
            return result

    start = time.perf_counter()
    threads = cpu.configure_threads(cfg.train)  # before anything is timed: the pace training will see
    device = plan.resolve_device(cfg.train.device)
    x, y = (torch.as_tensor(a).to(device) for a in data.split("train"))
    n_train = len(x)
    loss_fn = metrics.loss_fn(data.task)
    torch.manual_seed(cfg.train.seed)
    model = models.build_model(cfg.model, data.input_shape, data.output_dim).to(device).train()
    # every trial step (memory, throughput, noise scale) in the precision training will use
    model = precision.for_trials(model, cfg.train.precision, device)

    # 1. memory: the largest micro-batch that fits
    budget, budget_note = memory_budget(cfg, device)
    fit, held = memory_fit(cfg, model, loss_fn, x, y, device, budget)

    def optimizer_factory(m):
        return plan.make_optimizer(m, cfg.train, cfg.train.lr)

    # 2. gradient noise scale, after a short warm-up (the noise scale grows as the loss falls); first, because
    # the choice needs it while the ladder can still measure the rungs the choice hinges on
    small = max(1, min(fit.micro_batch, cfg.train.base_batch_size, n_train // (2 * cfg.probe.noise_accumulation)))
    noise = early_noise_scale(model, optimizer_factory, loss_fn, x, y, small, cfg.probe, cfg.train.seed)
    b_noise = noise.b_simple if noise.b_simple > 0 and math.isfinite(noise.b_simple) else float(small)
    print(f"probe: noise scale B_simple ~ {noise.b_simple:.0f} +- {noise.spread:.0f} ({noise.n_batches} batches "
          f"of {noise.big_batch}, one a step after {cfg.probe.warmup_steps} warm-up steps)", flush=True)

    # 3. throughput on a ladder of micro-batches (on its own copy, after the noise scale's is freed)
    timed = throughput_ladder(model, optimizer_factory, loss_fn, x, y, fit.micro_batch, device,
                              time_s=cfg.probe.throughput_time_s, remeasure=cfg.probe.throughput_remeasure,
                              timer=timer)
    ladder = timed["ladder"]

    # 4. recommendation. A close one (goodputs within CLOSE, or overlapping) first settles the rungs
    # it hinges on: on a busy CPU a slow spell through one rung's measurement lowered its median or
    # widened its spread, and the choice flipped between adjacent batches.
    choice = recommend(cfg, fit.micro_batch, ladder, b_noise, n_train)
    settled = hinges_on(choice, ladder) if cfg.probe.throughput_remeasure else []
    if settled:
        print(f"probe: throughput settling micro-batch{'es' * (len(settled) > 1)} {', '.join(map(str, settled))} "
              "(a close choice rests on them)", flush=True)
        timed["timing"].settle(settled)
        ladder = timed["ladder"] = timed["timing"].rungs()
        choice = recommend(cfg, fit.micro_batch, ladder, b_noise, n_train)
    del timed["timing"]  # it holds the ladder's model copy
    best = max(ladder, key=lambda r: r["samples_per_s"])
    knee = min(r["micro_batch_size"] for r in ladder if r["samples_per_s"] >= KNEE * best["samples_per_s"])
    scale = None
    if cfg.world_size > 1:  # 5. scaling across ranks, measured at the choice (components/scaling.py)
        scale = scaling.measure(cfg, config, dataset_path, choice["micro_batch_size"], choice["accumulation_steps"],
                                throughput_at(ladder, choice["micro_batch_size"]))
        print(f"probe: {scaling.reasoning(scale)}", flush=True)
        choice = recommend(cfg, fit.micro_batch, ladder, b_noise, n_train, scale["efficiency"])
    # 6. the trainer's own cost per step beyond the ladder's (components/loop_pace.py): the predicted pace adds it
    micro = choice["micro_batch_size"]
    loop = loop_pace.measure(config, data, micro, micro / throughput_at(ladder, micro))
    spread_note = choice.pop("spread_note")
    reasoning = [
        fit.reasoning,
        f"throughput flat above micro-batch {knee} ({best['samples_per_s']:,.0f} +- {best['spread']:,.0f} "
        f"samples/s at best, {threads} thread{'s' * (threads > 1)})",
        *_ladder_notes(timed, cfg.probe.throughput_remeasure),
        *([f"settled micro-batch{'es' * (len(settled) > 1)} {', '.join(map(str, settled))} over "
           f"{throughput.SETTLE_ROUNDS}x the passes (a close choice rested on them)"] if settled else []),
        f"B_simple ~ {noise.b_simple:.0f} +- {noise.spread:.0f} after {cfg.probe.warmup_steps} warm-up steps "
        f"(small batch {noise.small_batch}, big {noise.big_batch}, {noise.n_batches} batches, one a training step)",
        f"-> effective {choice['effective_batch_size']} = {choice['micro_batch_size']} x "
        f"{choice['accumulation_steps']} x {choice['world_size']}, lr {choice['lr']:.4g} "
        f"({cfg.train.lr_scaling} from {cfg.train.lr} at {cfg.train.base_batch_size})",
    ]
    if spread_note:
        reasoning.insert(-1, spread_note)
    if loop["overhead_s"] is not None:
        reasoning.insert(-1, f"the trainer's step at micro-batch {micro}: {1e3 * loop['seconds_per_step']:.3f} ms "
                             f"against the ladder's {1e3 * loop['ladder_seconds_per_step']:.3f} ms: "
                             f"{1e3 * loop['overhead_s']:.3f} ms a step of loop overhead in the predicted pace")
    if scale is not None:
        reasoning.insert(-1, scaling.reasoning(scale))
    result = {
        **identity,
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "memory": {"budget_bytes": budget, "budget": budget_note, "margin": fit.margin,
                   "micro_batch_size": fit.micro_batch, "trials": fit.trials, "fixed_bytes": fit.fixed_bytes,
                   "per_sample_bytes": fit.per_sample_bytes, **held, "reasoning": fit.reasoning},
        "cpu_threads": threads,
        "throughput": {"ladder": ladder, "knee_micro_batch_size": knee, "time_s": cfg.probe.throughput_time_s,
                       "remeasured": timed["remeasured"], "accepted_non_monotone": timed["accepted"],
                       "settled": settled,
                       "loop": loop},
        "noise_scale": noise.to_dict(),
        "scaling": scale,
        "recommendation": {k: v for k, v in choice.items() if k != "options"},
        "options": choice["options"],
        "reasoning": reasoning,
        "wall_time_s": time.perf_counter() - start,
    }
    storage.write_json(Path(out), result)
    store.put_file(Path(out), PROBE_FILE)
    print("probe: " + "; ".join(reasoning))

    run_id = cfg.run_id or Path(store.uri).name
    with storage.scratch_dir(f"probe-{run_id}-") as scratch:
        tracker = Tracker(cfg.tracking, scratch, run_id, "probe", {**config, **identity})
        for rung in ladder:
            tracker.log({k: rung[k] for k in ("micro_batch_size", "samples_per_s", "spread")})
        tracker.summarize({**{f"probe/{k}": v for k, v in result["recommendation"].items()},
                           "probe/b_simple": noise.b_simple, "probe/max_micro_batch_size": fit.micro_batch})
        tracker.finish()
        store.sync(scratch, run_store.local_files(scratch, "wandb"))
    return result


def _print_trial(n: int, micro_batch: int, peak: Optional[int], fits: bool) -> None:
    need = memory._fmt(peak) if peak is not None else "out of memory"
    print(f"probe: memory trial {n}: micro-batch {micro_batch} {'fits' if fits else 'does not fit'} ({need})",
          flush=True)


def _why_again(pairs: List, uncertain: List[int]) -> str:
    why = [", ".join(f"{big} slower than {small}" for small, big in pairs) + " beyond the spread"] if pairs else []
    if uncertain:
        why.append(f"{', '.join(map(str, uncertain))} uncertain by over {throughput.UNCERTAIN:.0%}")
    return "; ".join(why)


def _ladder_notes(timed: Dict, rounds: int) -> List[str]:
    """What re-measuring the ladder did, for the reasoning."""
    notes = [f"re-measured micro-batch{'es' * (len(r['micro_batch_sizes']) > 1)} "
             f"{', '.join(map(str, r['micro_batch_sizes']))} (round {r['round']}: "
             f"{_why_again(r['pairs'], r['uncertain'])})" for r in timed["remeasured"]]
    if timed["accepted"]:
        notes.append(f"throughput still falls ({', '.join(f'{small} -> {big}' for small, big in timed['accepted'])})"
                     f" after {rounds} re-measurement round{'s' * (rounds != 1)}: taken as real")
    return notes


@exit_on_user_error
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="resolved config (YAML or JSON)")
    parser.add_argument("--dataset", required=True, help="dataset artifact directory (from data_prep)")
    parser.add_argument("--out", required=True, help="where to write probe.json")
    parser.add_argument("--run-dir", required=True, help="the run's store (a directory or s3://)")
    args = parser.parse_args(argv)
    run(load_config_file(args.config), args.dataset, args.out, args.run_dir)


if __name__ == "__main__":
    main()
