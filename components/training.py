"""The training loop, meant to be read in one sitting: the Trainer steps through a Plan
(components/plan.py) over a TrainState (components/checkpoint.py), evaluates, stops early, and
writes metrics and checkpoints.

Words (see GUIDE.md): a micro-batch is what one forward/backward sees; `accumulation_steps`
micro-batches are summed into one optimizer step (iteration); the effective batch is
micro-batch x accumulation steps x world size; an epoch is one pass over the train split, cut
into windows of the effective batch (components/plan.py says why the last one is dropped).

One step: the micro-steps on one process (components/accumulation.py) or, across ranks, this
rank's shard of the window and then the step's one all-reduce that also agrees on out-of-memory
(components/distributed_step.py); out of memory halves the micro-batch and redoes the step; then
the optimizer step (fp16: the scaler may skip it, a "skipped_step" row in metrics.jsonl).
Rank 0 evaluates and broadcasts the numbers, so every rank's stopping rules take the same
decisions; only rank 0 writes. A checkpoint resumes with another world size at the same
effective batch (components/checkpoint.py).

The loop (Trainer._loop, micro_steps) is the hot path: bench/train_loop_overhead.py times it
against a hand-written loop, and each per-step call or lookup shows there.
"""

import math
import time
from pathlib import Path
from typing import Callable, List, Optional

import torch
from torch import nn

from components import checkpoint, distributed, early_stopping, memory, metrics, noise_scale, storage, tracking
from components.accumulation import NOISE_EVERY, NOISE_EVERY_SPLIT, accumulate_gradients, measuring_micro
from components.checkpoint import CHECKPOINT, TrainState
from components.config import Config, config_hash, for_dataset, largest_divisor_at_most, parse_config
from components.datasets import Dataset
from components.distributed_step import micro_steps_across_ranks
from components.plan import Plan, epoch_order, lr_at, make_optimizer, resolve_device
from components.precision import Precision
from components.run_record import RunRecord
from components.signals import finish_the_step_on_sigterm, sigint_held

METRICS = "metrics.jsonl"

# The row of every optimizer step, formatted directly: json.dumps took ~4x longer, and on a small
# model it was the loop's largest cost after torch. Every value reads back exactly: %.17g
# round-trips any double without the search for its shortest repr (slow, and a float32 loss
# read as a double needs 16-17 digits anyway). A non-finite loss goes through
# JsonlWriter.write, which writes it as null (strict JSON).
STEP_ROW = ('{"step": %d, "samples_seen": %d, "epoch": %r, "wall_time_s": %.6f, '
            '"train/loss": %.17g, "lr": %r}\n')


class Terminated(Exception):
    """SIGTERM arrived (a pod preempted or evicted, `kill`): the step in flight finished and the
    checkpoint was saved, so the run resumes from there."""


def advice(lr: float, plan: Plan) -> str:
    """What to try after a divergence, in one line."""
    warmup = max(10, plan.max_steps // 20)
    smaller = plan.effective_batch_size // 2
    return (f"try a lower train.lr (e.g. {lr / 4:.3g}), train.warmup_steps={warmup}"
            + (f", or a smaller batch (train.batch_size={smaller})" if smaller >= 1 else ""))


class Trainer:
    """One run's training: the loop over a TrainState, evaluation, checkpoints and metrics.

    The ranks come from the launcher's environment (distributed.start). Only rank 0 writes
    (metrics.jsonl, checkpoints); every rank trains its shard of each window. With `run_dir`,
    calling `fit()` again on the same directory resumes from the last checkpoint.
    `progress=None` shows a bar only on a terminal. `on_step(step)` runs after every optimizer
    step, `on_checkpoint()` after every checkpoint is written (the train step syncs it to the
    run's store).
    """

    def __init__(self, model: nn.Module, data: Dataset, cfg: Config, run_dir: Optional[Path] = None,
                 tracker: Optional[tracking.Tracker] = None, progress: Optional[bool] = None,
                 on_step: Optional[Callable[[int], None]] = None,
                 on_checkpoint: Optional[Callable[[], None]] = None):
        if cfg.eval.monitor is None or cfg.data.task is None:  # decided by the data (components.config.for_dataset)
            cfg = parse_config(for_dataset(cfg.to_dict(), data.manifest))
        t, e = cfg.train, cfg.eval
        self.cfg, self.data, self.tracker, self.on_step, self.progress = cfg, data, tracker, on_step, progress
        self.on_checkpoint = on_checkpoint
        self.dist = distributed.start(cfg.world_size, resolve_device(t.device))
        self.device, self.rank = self.dist.device, self.dist.rank
        self.x_train, self.y_train = (torch.as_tensor(a).to(self.device) for a in data.split("train"))
        self.x_val, self.y_val = (torch.as_tensor(a).to(self.device) for a in data.split("val"))
        self.plan = plan = Plan.make(cfg, len(self.x_train))
        self.loss_fn = metrics.loss_fn(data.task)
        self.n_classes = data.manifest["n_classes"] or 0
        self.target_scale = data.manifest.get("target_scale")  # regression: metrics in the target's units
        self.shard = plan.effective_batch_size // plan.world_size  # examples this rank sees per step
        # a measured step without accumulation runs two half-batches: a second forward/backward
        self.noise_every = t.noise_scale_every_steps or (NOISE_EVERY if plan.accumulation_steps > 1
                                                         else NOISE_EVERY_SPLIT)
        model.to(self.device).train()
        self.params = list(model.parameters())
        noise = noise_scale.NoiseScaleTracker(population=plan.n_train) if t.track_noise_scale else None
        self.precision = Precision(t.precision, self.device) if t.precision != "fp32" else None  # None: fp32
        self.state = TrainState(
            model=model, optimizer=make_optimizer(model, t, plan.lr), noise=noise,
            stopper=early_stopping.EarlyStopping(e.mode, e.patience, e.min_delta, e.target, e.divergence_threshold,
                                                 e.stop_at_target),
            micro_batch_size=plan.micro_batch_size, precision=self.precision)
        self.checkpoint_path = Path(run_dir) / CHECKPOINT if run_dir else None
        self.identity = {"config_hash": config_hash(cfg), "data_version": data.data_version}
        self.resumed_from: Optional[int] = None
        self.eval_chunk = 4096  # no activations are kept for backward, so big chunks usually fit; halved if not
        self.loss_since_eval: List[float] = []  # train losses since the last evaluation, for W&B and loss_exploded
        self.train_loss = float("nan")
        self.indices: Optional[torch.Tensor] = None  # the current step's examples
        self.terminate_requested = False  # set by SIGTERM (finish_the_step_on_sigterm)
        self.t0 = time.perf_counter()
        self._resume_or_seed(run_dir)
        self.dist.broadcast_tensors(list(model.state_dict().values()))  # every rank starts from rank 0's weights

    # ------------------------------------------------------------ state

    def _resume_or_seed(self, run_dir: Optional[Path]) -> None:
        ckpt = checkpoint.read(self.checkpoint_path, self.identity, self.dist.world_size,
                               self.plan.effective_batch_size)
        checkpoint.agree(self.dist, ckpt)
        self.log = storage.JsonlWriter(Path(run_dir) / METRICS) if run_dir and self.rank == 0 else None
        if ckpt is None:
            seed = self.cfg.train.seed + self.rank  # dropout draws, their own per rank
            if self.device.type == "cpu":  # torch.manual_seed also queues CUDA's seed with a stack trace (~100 us)
                torch.default_generator.manual_seed(seed)
            else:
                torch.manual_seed(seed)
            return
        self.state.load_state_dict(ckpt, self.rank)
        self.resumed_from = self.state.step
        if self.log:
            self.log.truncate(ckpt["metrics_offset"])  # rows after the checkpoint are written again
        written_by = len(ckpt["rng"])
        if written_by != self.dist.world_size:
            s = self.state
            checkpoint.regroup(s, self.shard, self.rank, self.cfg.train.seed, written_by)
            if self.log:
                self.log.write(self.row({"event": "world_size_changed", "from": written_by,
                                         "to": self.dist.world_size, "micro_batch_size": s.micro_batch_size,
                                         "accumulation_steps": self.shard // s.micro_batch_size}))

    def save_checkpoint(self) -> None:
        if self.checkpoint_path is None:
            return
        rng = self.dist.gather(torch.get_rng_state())  # a collective: every rank saves at the same steps
        if self.dist.is_main:
            checkpoint.write(self.checkpoint_path, self.state, self.identity, rng,
                             self.log.offset() if self.log else 0, self.elapsed())
            if self.on_checkpoint:
                self.on_checkpoint()
        self.dist.barrier()  # no rank goes on (to a resume, say) before the checkpoint is there

    def elapsed(self) -> float:
        return self.state.wall_time_s + time.perf_counter() - self.t0

    def row(self, extra: dict) -> dict:
        step, plan = self.state.step, self.plan
        return {"step": step, "samples_seen": step * plan.effective_batch_size,
                "epoch": step / plan.steps_per_epoch, "wall_time_s": round(self.elapsed(), 6), **extra}

    # ------------------------------------------------------------ one step, one evaluation

    def micro_steps(self, m: int) -> List[torch.Tensor]:
        """One optimizer step's forward/backward at micro-batch m over the current indices."""
        s = self.state
        measure_at = None
        if s.noise is not None and s.step % self.noise_every == 0:
            measure_at = measuring_micro(self.shard, m)
        if self.dist.distributed:
            return micro_steps_across_ranks(self.dist, self.params, s.model, self.loss_fn, self.x_train, self.y_train,
                                            self.indices, measure_at or m, self.precision,
                                            s.noise if measure_at is not None else None,
                                            self.plan.effective_batch_size)
        if measure_at is not None:
            return accumulate_gradients(s.model, self.loss_fn, self.x_train, self.y_train, self.indices,
                                        measure_at, s.noise, self.precision, self.params)
        return accumulate_gradients(s.model, self.loss_fn, self.x_train, self.y_train, self.indices, m,
                                    precision=self.precision)

    def smaller_micro(self, m: int) -> int:
        return largest_divisor_at_most(self.shard, m // 2)

    def on_oom(self, old: int, new: int) -> None:
        # Out of memory (variable inputs, fragmentation): redo this step with a smaller
        # micro-batch and more accumulation: the same update, the same effective batch.
        self.state.optimizer.zero_grad(set_to_none=True)
        self.state.oom_events.append({"step": self.state.step + 1, "from": old, "to": new})
        if self.log:
            self.log.write(self.row({"event": "out_of_memory", "micro_batch_size": new,
                                     "accumulation_steps": self.shard // new}))

    def validation_metrics(self) -> dict:
        """Rank 0 evaluates the whole validation split and every rank gets its numbers: the
        stopping rules then see the same values and take the same decisions on every rank."""
        if self.dist.distributed:
            self.dist.broadcast_tensors(list(self.state.model.buffers()))  # e.g. batch-norm statistics
            return self.dist.broadcast(self.own_validation_metrics() if self.dist.is_main else None)
        return self.own_validation_metrics()

    def own_validation_metrics(self) -> dict:
        values, self.eval_chunk = memory.halving_on_oom(
            lambda chunk: metrics.evaluate(self.state.model, self.x_val, self.y_val, self.data.task, self.n_classes,
                                           chunk=chunk, target_scale=self.target_scale), self.eval_chunk)
        return values

    def evaluate(self, bar) -> None:
        s, e = self.state, self.cfg.eval
        started = time.perf_counter()
        values = self.validation_metrics()
        if s.noise is not None and s.noise.value is not None:
            values["gns/b_simple"] = s.noise.value
        had_target = s.stopper.target_step is not None
        if self.loss_since_eval and s.first_loss is not None:
            s.stopper.train_loss(sum(self.loss_since_eval) / len(self.loss_since_eval), s.first_loss, s.step)
        # NaN weights can still give a finite accuracy (argmax of NaN logits): the loss tells
        monitored = values[e.monitor] if math.isfinite(values["val/loss"]) else values["val/loss"]
        if not s.stopper.diverged and s.stopper.update(monitored, s.step, e.monitor):
            s.keep_best()
        if not had_target and s.stopper.target_step is not None:
            now = self.elapsed()
            s.target_at = {"steps": s.step, "samples": s.step * self.plan.effective_batch_size, "time_s": now,
                           "train_time_s": now - s.eval_time_s - (time.perf_counter() - started)}
        out = self.row(values)
        if self.log:
            self.log.write(out)
        if self.tracker:  # one W&B call per evaluation, carrying the train loss since the last one
            self.tracker.log(tracking.eval_row(out, self.loss_since_eval, s.optimizer.param_groups[0]["lr"]))
        self.loss_since_eval.clear()
        if not bar.disable:
            bar.set_postfix({"train/loss": f"{self.train_loss:.4f}", e.monitor: f"{values[e.monitor]:.4f}"},
                            refresh=False)
        s.eval_time_s += time.perf_counter() - started

    # ------------------------------------------------------------ the loop

    def fit(self) -> RunRecord:
        """Train the model in place and leave the best weights (by `eval.monitor`) loaded in it."""
        from tqdm.auto import tqdm

        s, plan = self.state, self.plan
        bar = tqdm(total=plan.max_steps, initial=s.step, unit="step", desc="train",
                   disable=(None if self.progress is None else not self.progress) if self.dist.is_main else True)
        self.t0 = time.perf_counter()
        try:
            with finish_the_step_on_sigterm(self):
                if s.step == 0 and s.stopper.first is None:  # where it started: what a collapse falls back to
                    s.stopper.start(self.validation_metrics()[self.cfg.eval.monitor])
                    self.t0 = time.perf_counter()  # not training time
                if not s.finished:
                    self._loop(bar)
                    self._finish(bar)
        except KeyboardInterrupt:
            if not self.dist.distributed:  # across ranks Ctrl-C lands mid-collective on some: SIGTERM saves
                with sigint_held():
                    self.save_checkpoint()  # Ctrl-C: the run resumes from here
            raise
        finally:
            bar.close()
            if self.log:
                self.log.close()
        if s.best_state is not None:
            s.model.load_state_dict(s.best_state)
        return self.result()

    def _loop(self, bar) -> None:
        s, plan, t, log = self.state, self.plan, self.cfg.train, self.log
        stopper, optimizer, shard, rank, precision = s.stopper, s.optimizer, self.shard, self.rank, self.precision
        params = self.params
        batch, steps_per_epoch, tracker, on_step = plan.effective_batch_size, plan.steps_per_epoch, self.tracker, self.on_step
        max_steps, eval_every, show_bar = plan.max_steps, plan.eval_every_steps, not bar.disable
        every_steps, every_s = t.checkpoint_every_steps, t.checkpoint_every_s
        constant_lr = t.warmup_steps == 0 and t.schedule == "constant"  # set once, not every step
        schedule_steps = plan.schedule_steps
        lr = lr_at(s.step, plan.lr, t, schedule_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        last_flush = last_checkpoint = time.perf_counter()
        last_eval_step = s.step
        while not stopper.should_stop and s.step < max_steps:
            epoch, first_window = divmod(s.step, steps_per_epoch)
            order = epoch_order(t.seed, epoch, plan.n_train).to(self.device)
            for window in range(first_window, steps_per_epoch):
                start = window * batch + rank * shard
                self.indices = order[start:start + shard]
                if not constant_lr:
                    lr = lr_at(s.step, plan.lr, t, schedule_steps)
                    for group in optimizer.param_groups:
                        group["lr"] = lr

                losses, s.micro_batch_size = memory.halving_on_oom(self.micro_steps, s.micro_batch_size,
                                                                   self.smaller_micro, self.on_oom)
                if precision is None:
                    optimizer.step()
                    stepped = True
                else:
                    stepped = precision.step(optimizer)  # fp16: False when the scaler skipped it
                for p in params:  # optimizer.zero_grad(set_to_none=True) without its profiler hooks (~8 us)
                    p.grad = None
                s.step += 1
                step = s.step
                if not stepped and log:
                    log.write(self.row({"event": "skipped_step", "loss_scale": precision.scale}))

                # The mean micro-batch loss, read one by one: on CPU cheaper than stacking them (two more
                # ops a step cost 2.7% of the loop at 32 x 4); on a GPU the first .item() waits for the
                # step and the others copy one number each.
                self.train_loss = train_loss = (losses[0].item() if len(losses) == 1
                                                else sum([loss.item() for loss in losses]) / len(losses))
                self.loss_since_eval.append(train_loss)
                if s.first_loss is None:
                    s.first_loss = train_loss
                finite = math.isfinite(train_loss)
                now = time.perf_counter()
                # a dict only for W&B following live or a non-finite loss; otherwise the fast row
                out = self.row({"train/loss": train_loss, "lr": lr}) if tracker or not finite else None
                if log and out is None:
                    log.write_later(STEP_ROW, (step, step * batch, step / steps_per_epoch,
                                               s.wall_time_s + now - self.t0, train_loss, lr))
                elif log:
                    log.write(out)
                if tracker:
                    tracker.log_train(out)
                if show_bar:
                    bar.update()
                if on_step:
                    on_step(step)
                if not finite:
                    stopper.non_finite_loss(train_loss, step)
                    break
                if step % eval_every == 0 or step == max_steps:
                    self.evaluate(bar)
                    last_eval_step = step
                    now = time.perf_counter()
                due = bool((every_steps and step % every_steps == 0) or (every_s and now - last_checkpoint >= every_s))
                stop = self.terminate_requested
                if self.dist.distributed:  # each rank's clock and signals: agreed, or the ranks part ways
                    # (a SIGTERM landing during this collective stays set, for the next step's agreement)
                    due, stop = self.dist.any(due, stop)
                if due:
                    self.save_checkpoint()
                    last_checkpoint = now
                if stopper.should_stop or step >= max_steps:
                    break
                if stop:
                    self.save_checkpoint()
                    raise Terminated(f"SIGTERM: stopped after step {step} with a checkpoint; the run resumes from it")
                if log and now - last_flush > 0.5:  # keeps progress readers current
                    log.flush()
                    last_flush = now
        if last_eval_step != s.step and stopper.stop_reason != early_stopping.NON_FINITE:
            self.evaluate(bar)  # the last steps count toward the best weights too

    def _finish(self, bar) -> None:
        s = self.state
        if s.stopper.diverged:
            lr = s.optimizer.param_groups[0]["lr"]
            s.divergence = {"rule": s.stopper.divergence_rule, "detail": s.stopper.divergence_detail,
                            "step": s.step, "lr": lr, "advice": advice(lr, self.plan)}
        bar.set_description_str(f"train ({self.stop_reason()})")
        s.finished = True
        self.save_checkpoint()

    def stop_reason(self) -> str:
        return self.state.stopper.stop_reason or self.plan.limit

    def result(self) -> RunRecord:
        """The run's record as far as training knows it (evaluate adds the test metrics)."""
        s, plan, target_at, cfg = self.state, self.plan, self.state.target_at, self.cfg
        best = s.best_state is not None
        return RunRecord(
            run_id=cfg.run_id, status="diverged" if s.divergence else "completed", stop_reason=self.stop_reason(),
            divergence=s.divergence, task=self.data.task, effective_batch_size=plan.effective_batch_size,
            micro_batch_size=s.micro_batch_size, accumulation_steps=self.shard // s.micro_batch_size,
            world_size=plan.world_size, lr=plan.lr, optimizer=cfg.train.optimizer, optimizer_steps=s.step,
            epochs=s.step / plan.steps_per_epoch, samples_seen=s.step * plan.effective_batch_size,
            steps_per_epoch=plan.steps_per_epoch, max_steps=plan.max_steps, wall_time_s=self.elapsed(),
            eval_time_s=s.eval_time_s,
            best_metric={"name": cfg.eval.monitor, "value": s.stopper.best if best else None,
                         "step": s.stopper.best_step if best else None},
            target=cfg.eval.target, steps_to_target=target_at["steps"] if target_at else None,
            samples_to_target=target_at["samples"] if target_at else None,
            time_to_target_s=target_at["time_s"] if target_at else None,
            train_time_to_target_s=target_at["train_time_s"] if target_at else None,
            resumed_from_step=self.resumed_from, data_version=self.identity["data_version"],
            config_hash=self.identity["config_hash"], counts=self.data.manifest["counts"], oom_events=s.oom_events,
            gns_b_simple=s.noise.value if s.noise is not None else None)


def fit(model: nn.Module, data: Dataset, cfg: Config, run_dir: Optional[Path] = None,
        tracker: Optional[tracking.Tracker] = None, progress: Optional[bool] = None,
        on_step: Optional[Callable[[int], None]] = None) -> RunRecord:
    """Train `model` in place and leave the best weights (by `eval.monitor`) loaded in it:
    `Trainer(...).fit()`. See Trainer for the arguments."""
    return Trainer(model, data, cfg, run_dir, tracker, progress, on_step).fit()
