"""The training loop: accumulation equivalence, LR rules, resume, determinism, stopping."""

import math

import pytest
import torch

from components import accumulation, early_stopping, models, noise_scale, plan, storage, training
from components.config import parse_config
from conftest import config
from pipelines.config import CONF_DIR, compose_config


def train(cfg, data, run_dir=None, on_step=None, tracker=None):
    torch.manual_seed(cfg.train.seed)
    model = models.build_model(cfg.model, data.input_shape, data.output_dim)
    result = training.fit(model, data, cfg, run_dir, tracker, progress=False, on_step=on_step)
    return model, result


def params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_accumulation_gives_the_same_update_as_one_big_batch(digits, optimizer):
    """32 x 1, 8 x 4 and 4 x 8 must train to the same parameters: the loss scaling makes the
    summed micro-batch gradients the mean over the effective batch."""
    runs = {}
    for micro in (32, 8, 4):
        cfg = config(train={"batch_size": 32, "micro_batch_size": micro, "max_steps": 40, "optimizer": optimizer,
                            "lr": 0.05 if optimizer == "sgd" else 0.002, "checkpoint_every_steps": None},
                     eval={"every_steps": 40})
        model, result = train(cfg, digits)
        assert result.accumulation_steps == 32 // micro and result.optimizer_steps == 40
        runs[micro] = params(model)
    assert not torch.equal(runs[32], params(models.build_model(config().model, (1, 8, 8), 10)))  # it trained
    torch.testing.assert_close(runs[8], runs[32], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(runs[4], runs[32], rtol=1e-5, atol=1e-6)


def test_accumulated_gradient_equals_the_full_batch_gradient(digits):
    """One step of the loop's own accumulate_gradients at 16 x 4 leaves in .grad the gradient of
    one forward/backward over all 64 examples."""
    cfg = config()
    x, y = (torch.as_tensor(a) for a in digits.split("train"))
    indices = torch.arange(64)
    torch.manual_seed(0)
    model = models.build_model(cfg.model, digits.input_shape, 10)
    torch.nn.functional.cross_entropy(model(x[:64]), y[:64]).backward()
    full = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    losses = accumulation.accumulate_gradients(model, torch.nn.functional.cross_entropy, x, y, indices, 16)
    assert len(losses) == 4
    for a, b in zip(full, (p.grad for p in model.parameters())):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_a_noise_measuring_step_without_accumulation_splits_the_batch_and_keeps_the_update(digits):
    """With one micro-batch per step the measuring steps run as two halves: the same update (to
    float rounding) as the unsplit step, and a noise-scale sample from the half-batch norm."""
    x, y = (torch.as_tensor(a) for a in digits.split("train"))
    indices = torch.randperm(len(x), generator=torch.Generator().manual_seed(1))[:32]
    grads = {}
    for split in (False, True):
        torch.manual_seed(0)
        model = models.build_model(config().model, digits.input_shape, 10)
        noise = noise_scale.NoiseScaleTracker(population=len(x))
        micro = accumulation.measuring_micro(32, 32) if split else 32
        accumulation.accumulate_gradients(model, torch.nn.functional.cross_entropy, x, y, indices, micro,
                                      noise if split else None)
        grads[split] = torch.cat([p.grad.flatten() for p in model.parameters()])
        if split:
            assert micro == 16 and noise.updates == 1 and noise.grad_sq != 0.0
    torch.testing.assert_close(grads[True], grads[False], rtol=1e-5, atol=1e-7)
    assert [accumulation.measuring_micro(b, b) for b in (32, 15, 7, 1)] == [16, 5, None, None]
    assert accumulation.measuring_micro(128, 32) == 32  # with accumulation, the step's own micro-batch


def test_every_run_tracks_the_noise_scale_and_measuring_steps_do_not_change_training(digits, tmp_path):
    on, off = (config(train={"batch_size": 32, "micro_batch_size": 32, "max_steps": 80, "track_noise_scale": track,
                             "noise_scale_every_steps": 4, "checkpoint_every_steps": None}, eval={"every_steps": 20})
               for track in (True, False))
    model_on, result = train(on, digits, tmp_path)
    model_off, _ = train(off, digits)
    evals = [r for r in storage.read_jsonl(tmp_path / "metrics.jsonl") if "val/loss" in r]
    # None while |G|^2's estimate is not above its noise (halves of 16 are a noisy small batch)
    tracked = [r["gns/b_simple"] for r in evals if "gns/b_simple" in r]
    assert len(evals) == 4 and len(tracked) >= 3 and "gns/b_simple" in evals[-1]
    assert all(1 < b < 10_000 for b in tracked) and result.gns_b_simple == evals[-1]["gns/b_simple"]
    torch.testing.assert_close(params(model_on), params(model_off), rtol=1e-4, atol=1e-5)


def test_last_incomplete_window_is_dropped_and_every_step_sees_the_effective_batch(digits, tmp_path):
    cfg = config(train={"batch_size": 100, "micro_batch_size": 50, "max_epochs": 2, "lr_scaling": "none"},
                 eval={"patience": 100})
    _, result = train(cfg, digits, tmp_path)
    assert result.steps_per_epoch == 1259 // 100 == 12
    assert result.optimizer_steps == 24 and result.samples_seen == 2400 and result.epochs == 2.0
    assert result.stop_reason == early_stopping.MAX_EPOCHS
    rows = [r for r in storage.read_jsonl(tmp_path / "metrics.jsonl") if "train/loss" in r]
    assert [r["samples_seen"] for r in rows] == [100 * s for s in range(1, 25)]
    order = plan.epoch_order(0, 0, 1259)
    assert len(set(order[:1200].tolist())) == 1200  # one epoch: 12 disjoint windows of 100
    assert not torch.equal(order, plan.epoch_order(0, 1, 1259))  # reshuffled every epoch


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_the_fused_optimizer_trains_to_the_unfused_weights(digits, optimizer):
    """make_optimizer picks torch's fused kernels for CPU parameters (components/plan.py); 40 steps
    of fit end where the same steps of the unfused optimizer end, up to rounding."""
    cfg = config(train={"batch_size": 32, "micro_batch_size": 32, "max_steps": 40, "optimizer": optimizer,
                        "lr": 0.05 if optimizer == "sgd" else 0.002}, eval={"every_steps": 40})
    torch.manual_seed(0)
    model = models.build_model(cfg.model, digits.input_shape, 10)
    assert plan.make_optimizer(model, cfg.train, 0.1).defaults["fused"] is True
    fused, _ = train(cfg, digits)
    x, y = (torch.as_tensor(a) for a in digits.split("train"))
    opt = (torch.optim.SGD(model.parameters(), lr=0.05, momentum=cfg.train.momentum) if optimizer == "sgd"
           else torch.optim.AdamW(model.parameters(), lr=0.002, weight_decay=cfg.train.weight_decay))
    for step in range(40):  # fit's order of examples: plan.epoch_order, windows of the batch
        epoch, window = divmod(step, len(x) // 32)
        idx = plan.epoch_order(cfg.train.seed, epoch, len(x))[window * 32:(window + 1) * 32]
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    assert not torch.equal(params(fused), params(models.build_model(cfg.model, (1, 8, 8), 10)))  # it trained
    torch.testing.assert_close(params(fused), params(model), rtol=1e-4, atol=1e-5)


class SparseEmbeddingModel(torch.nn.Module):
    """digits with an embedding of each image's first pixel: a model whose gradients are partly sparse."""

    def __init__(self):
        super().__init__()
        self.embedding = torch.nn.Embedding(17, 4, sparse=True)
        self.head = torch.nn.Linear(4 + 64, 10)

    def forward(self, x):
        x = x.flatten(1)
        pixel = (x[:, 0].abs() * 16).clamp(0, 16).long()
        return self.head(torch.cat([self.embedding(pixel), x], dim=1))


def test_a_model_with_sparse_gradients_trains_with_the_unfused_optimizer_and_its_noise_scale(digits, tmp_path):
    """The fused kernels and torch's fused norm refuse sparse gradients (nn.Embedding(sparse=True)):
    such a model gets the unfused optimizer, trains, and has its noise scale measured, in the
    training loop and in the probe's measurement."""
    torch.manual_seed(0)
    model = SparseEmbeddingModel()
    assert not plan.make_optimizer(model, config().train, 0.1).defaults["fused"]
    before = model.embedding.weight.detach().clone()
    cfg = config(train={"batch_size": 32, "micro_batch_size": 32, "max_steps": 48}, eval={"every_steps": 16})
    result = training.fit(model, digits, cfg, tmp_path / "run", progress=False)
    assert result.optimizer_steps == 48 and result.status == "completed"
    assert not torch.equal(before, model.embedding.weight)  # the sparse rows were stepped
    assert result.gns_b_simple is not None and math.isfinite(result.gns_b_simple)
    x, y = (torch.as_tensor(a) for a in digits.split("train"))
    measured = noise_scale.measure(model, torch.nn.functional.cross_entropy, x, y, 16, 4, 8, torch.Generator().manual_seed(0))
    assert measured.n_batches == 8 and math.isfinite(measured.grad_sq) and math.isfinite(measured.trace)


def test_lr_scaling_rules():
    assert plan.scaled_lr(0.1, 256, 32, "linear") == pytest.approx(0.8)
    assert plan.scaled_lr(0.1, 256, 64, "sqrt") == pytest.approx(0.2)
    assert plan.scaled_lr(0.1, 256, 32, "none") == pytest.approx(0.1)
    assert plan.scaled_lr(0.1, 16, 32, "linear") == pytest.approx(0.05)


def test_warmup_then_cosine_schedule():
    t = config(train={"warmup_steps": 4, "schedule": "cosine"}).train
    lrs = [plan.lr_at(s, 1.0, t, total_steps=14) for s in range(15)]
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0) and lrs[9] == pytest.approx(0.5) and lrs[14] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    constant = config(train={"warmup_steps": 2}).train
    assert [plan.lr_at(s, 0.4, constant, 10) for s in range(4)] == pytest.approx([0.2, 0.4, 0.4, 0.4])


def test_logged_lr_is_the_scaled_and_scheduled_lr(digits, tmp_path):
    cfg = config(train={"batch_size": 64, "micro_batch_size": 64, "lr": 0.05, "base_batch_size": 32,
                        "warmup_steps": 5, "schedule": "cosine", "max_steps": 30})
    _, result = train(cfg, digits, tmp_path)
    assert result.lr == pytest.approx(0.1)
    rows = [r for r in storage.read_jsonl(tmp_path / "metrics.jsonl") if "lr" in r]
    expected = [plan.lr_at(s, 0.1, cfg.train, 30) for s in range(30)]
    assert [r["lr"] for r in rows] == pytest.approx(expected)


def test_metrics_rows_per_step_and_per_evaluation(digits, tmp_path):
    cfg = config(train={"max_steps": 50}, eval={"every_steps": 20})
    train(cfg, digits, tmp_path)
    rows = storage.read_jsonl(tmp_path / "metrics.jsonl")
    steps = [r for r in rows if "train/loss" in r]
    evals = [r for r in rows if "val/loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 51))
    assert [r["step"] for r in evals] == [20, 40, 50]  # every 20 steps, and the last step
    for r in rows:
        assert {"step", "samples_seen", "epoch", "wall_time_s"} <= set(r)
        assert r["samples_seen"] == 32 * r["step"] and r["epoch"] == pytest.approx(r["step"] / 39)
    assert {"val/accuracy", "val/macro_f1"} <= set(evals[0])
    assert all(a["wall_time_s"] <= b["wall_time_s"] for a, b in zip(rows, rows[1:]))


def test_the_formatted_step_row_reads_back_as_json_dumps_writes_it():
    """The per-step row skips json.dumps for speed; every value must still read back exactly."""
    import json
    import random

    rng = random.Random(0)
    cosine = config(train={"schedule": "cosine"}).train  # once: composing a config takes ~35 ms
    for step in range(1, 300):
        loss = torch.tensor(rng.lognormvariate(0, 3)).item()  # a float32 value, as .item() gives
        lr = plan.lr_at(step, 0.1, cosine, 300)
        expected = {"step": step, "samples_seen": 96 * step, "epoch": step / 37, "wall_time_s": round(step * 0.0173, 4),
                    "train/loss": loss, "lr": lr}
        line = training.STEP_ROW % (step, 96 * step, step / 37, step * 0.0173, loss, lr)
        assert line.endswith("}\n") and line.count("\n") == 1
        assert json.loads(line) == expected


def test_same_seed_same_weights(digits):
    cfg = config(train={"max_steps": 30}, model={"dropout": 0.2})
    a, _ = train(cfg, digits)
    b, _ = train(cfg, digits)
    assert torch.equal(params(a), params(b))
    c, _ = train(config(train={"max_steps": 30, "seed": 1}, model={"dropout": 0.2}), digits)
    assert not torch.equal(params(a), params(c))


class Crash(Exception):
    pass


def crash_at(n: int):
    """An on_step callback that stops the run with Crash right after step n."""
    def on_step(step):
        if step == n:
            raise Crash
    return on_step


def test_resume_ends_with_the_same_weights_and_rows_as_an_uninterrupted_run(digits, tmp_path):
    # dropout makes the RNG state part of what must be restored
    cfg = config(train={"max_steps": 80, "checkpoint_every_steps": 10, "micro_batch_size": 16},
                 eval={"every_steps": 15, "patience": 100}, model={"dropout": 0.1})
    full, full_result = train(cfg, digits, tmp_path / "full")

    with pytest.raises(Crash):
        train(cfg, digits, tmp_path / "resumed", on_step=crash_at(47))
    assert storage.load_torch(tmp_path / "resumed" / training.CHECKPOINT)["step"] == 40
    resumed, resumed_result = train(cfg, digits, tmp_path / "resumed")

    assert resumed_result.resumed_from_step == 40
    assert torch.equal(params(resumed), params(full))
    assert resumed_result.best_metric == full_result.best_metric
    strip = lambda rows: [{k: v for k, v in r.items() if k != "wall_time_s"} for r in rows]  # noqa: E731
    assert strip(storage.read_jsonl(tmp_path / "resumed" / "metrics.jsonl")) == \
        strip(storage.read_jsonl(tmp_path / "full" / "metrics.jsonl"))

    finished = storage.load_torch(tmp_path / "resumed" / training.CHECKPOINT)
    # what a finished run produced, its best weights, and not what continuing would need
    assert finished["finished"] and finished["model"] is None and finished["optimizer"] is None
    assert finished["best_state"] is not None
    again, again_result = train(cfg, digits, tmp_path / "resumed")  # a finished run stays finished
    assert again_result.optimizer_steps == 80 and torch.equal(params(again), params(full))
    assert again_result.best_metric == full_result.best_metric


def test_sigterm_finishes_the_step_saves_a_checkpoint_and_the_run_resumes_to_the_same_weights(digits, tmp_path):
    import os
    import signal

    cfg = config(train={"max_steps": 60, "micro_batch_size": 16}, eval={"every_steps": 25, "patience": 100})
    full, _ = train(cfg, digits, tmp_path / "full")
    before = signal.getsignal(signal.SIGTERM)

    def preempt_at_23(step):
        if step == 23:
            os.kill(os.getpid(), signal.SIGTERM)  # what Kubernetes sends a pod it evicts

    with pytest.raises(training.Terminated, match="after step 23"):
        train(cfg, digits, tmp_path / "resumed", on_step=preempt_at_23)
    assert signal.getsignal(signal.SIGTERM) is before  # the handler lives only while fit runs
    assert storage.load_torch(tmp_path / "resumed" / training.CHECKPOINT)["step"] == 23
    resumed, result = train(cfg, digits, tmp_path / "resumed")
    assert result.resumed_from_step == 23 and result.optimizer_steps == 60
    assert torch.equal(params(resumed), params(full))


def test_a_checkpoint_from_before_per_rank_rng_states_still_resumes(digits, tmp_path):
    cfg = config(train={"max_steps": 20, "checkpoint_every_steps": 10}, eval={"every_steps": 10, "patience": 100})
    full, _ = train(cfg, digits, tmp_path / "full")

    with pytest.raises(Crash):
        train(cfg, digits, tmp_path / "old", on_step=crash_at(15))
    path = tmp_path / "old" / training.CHECKPOINT
    ckpt = storage.load_torch(path)
    storage.save_torch({**ckpt, "rng": ckpt["rng"][0]}, path)  # the single-tensor form older runs wrote
    resumed, result = train(cfg, digits, tmp_path / "old")
    assert result.resumed_from_step == 10 and torch.equal(params(resumed), params(full))


def test_resume_refuses_a_run_directory_with_another_config(digits, tmp_path):
    train(config(train={"max_steps": 10, "checkpoint_every_steps": 5}), digits, tmp_path)
    from components.errors import ConfigError

    with pytest.raises(ConfigError, match="different config_hash"):
        train(config(train={"max_steps": 10, "lr": 0.01}), digits, tmp_path)


def test_the_train_step_refuses_another_config_before_touching_the_finished_run(digits, tmp_path):
    from components import datasets
    from components import train as train_step
    from components.errors import ConfigError

    datasets.save(digits, tmp_path / "data")
    run = tmp_path / "run"
    train_step.run(config(train={"max_steps": 10}).to_dict(), str(tmp_path / "data"), str(tmp_path / "m.pt"), str(run))
    before = {p.name: p.read_bytes() for p in (run / "summary.json", run / training.METRICS)}
    with pytest.raises(ConfigError, match="different config_hash"):
        train_step.run(config(train={"max_steps": 10, "lr": 0.01}).to_dict(), str(tmp_path / "data"),
                       str(tmp_path / "m.pt"), str(run))
    assert {p.name: p.read_bytes() for p in (run / "summary.json", run / training.METRICS)} == before


def test_target_records_steps_samples_and_time(digits):
    cfg = config(eval={"target": 0.9, "every_steps": 10})
    model, result = train(cfg, digits)
    assert result.stop_reason == early_stopping.TARGET_REACHED
    assert result.steps_to_target % 10 == 0 and result.steps_to_target == result.optimizer_steps
    assert result.samples_to_target == 32 * result.steps_to_target
    assert 0 < result.time_to_target_s <= result.wall_time_s
    assert result.best_metric["value"] >= 0.9
    # evaluations every 10 steps take time that is not training
    assert 0 < result.eval_time_s < result.wall_time_s
    assert 0 < result.train_time_to_target_s < result.time_to_target_s - 0.5 * result.eval_time_s


def test_time_to_target_is_recorded_while_training_on(digits):
    cfg = config(eval={"target": 0.9, "every_steps": 10, "stop_at_target": False, "patience": 3},
                 train={"max_epochs": 8})
    model, result = train(cfg, digits)
    assert result.stop_reason in (early_stopping.PATIENCE, "max_epochs")
    assert result.steps_to_target % 10 == 0 and result.steps_to_target < result.optimizer_steps
    assert result.samples_to_target == 32 * result.steps_to_target
    assert 0 < result.time_to_target_s < result.wall_time_s


def test_patience_stops_and_the_best_weights_are_restored(digits):
    cfg = config(eval={"patience": 2}, train={"max_epochs": 50})
    model, result = train(cfg, digits)
    assert result.stop_reason == early_stopping.PATIENCE
    assert result.optimizer_steps < 50 * 39
    from components import metrics

    x, y = (torch.as_tensor(a) for a in digits.split("val"))
    restored = metrics.evaluate(model, x, y, "classification", 10)["val/accuracy"]
    assert restored == result.best_metric["value"]
    assert result.best_metric["step"] <= result.optimizer_steps - 2 * 39


def test_non_finite_loss_stops_at_once_and_restores_the_last_finite_best(digits, tmp_path):
    cfg = config(train={"max_steps": 200}, eval={"every_steps": 5})
    torch.manual_seed(cfg.train.seed)
    model = models.build_model(cfg.model, digits.input_shape, 10)

    def poison(step):  # a NaN weight after step 12: the loss of step 13 is NaN
        if step == 12:
            with torch.no_grad():
                next(model.parameters())[0, 0] = float("nan")

    result = training.fit(model, digits, cfg, tmp_path, progress=False, on_step=poison)
    rows = storage.read_jsonl(tmp_path / "metrics.jsonl")
    assert (result.status, result.stop_reason, result.optimizer_steps) == ("diverged", early_stopping.NON_FINITE, 13)
    assert result.divergence["rule"] == early_stopping.RULE_NON_FINITE and result.divergence["step"] == 13
    # the last row (written by JsonlWriter.write, not training.STEP_ROW) carries the loss as null
    assert rows[-1]["train/loss"] is None and rows[-1]["train/loss_note"] == "non-finite (nan)"
    assert rows[-1]["step"] == 13 and all(math.isfinite(r["train/loss"]) for r in rows[:-1] if "train/loss" in r)
    assert result.best_metric["step"] == 10  # the last finite evaluation's weights, restored
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_divergence_threshold_stops_training(digits):
    cfg = config(train={"lr": 5.0, "max_steps": 200}, eval={"every_steps": 5, "monitor": "val/loss",
                                                             "mode": "min", "divergence_threshold": 3.0})
    _, result = train(cfg, digits)
    assert result.stop_reason in (early_stopping.DIVERGED, early_stopping.NON_FINITE)
    assert result.optimizer_steps < 200


def test_effective_batch_larger_than_the_train_split_is_refused(digits):
    from components.errors import ConfigError

    with pytest.raises(ConfigError, match=r"train.batch_size: effective batch 2048 is larger than the training split \(1259"):
        train(config(train={"batch_size": 2048, "micro_batch_size": 256}), digits)


def test_user_model_factory(digits, tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(
        "import math, torch\n"
        "def build(input_shape, output_dim, width=16):\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(math.prod(input_shape), width),\n"
        "                               torch.nn.Tanh(), torch.nn.Linear(width, output_dim))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = config(model={"factory": "my_models:build", "kwargs": {"width": 24}}, train={"max_steps": 40})
    model, result = train(cfg, digits)
    assert model[1].out_features == 24
    assert result.best_metric["value"] > 0.5
    with pytest.raises(Exception, match="model.factory: cannot import 'no_such_module'"):
        models.build_model(config(model={"factory": "no_such_module:f"}).model, (64,), 10)


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")))
def test_every_experiment_trains_a_few_steps(name, tmp_path):
    """Each experiment config, through the same steps as the pipeline (probe kept short)."""
    from components import data_prep, probe
    from components import train as train_step
    from components.config import with_batch_sizes

    raw = compose_config([f"experiment={name}", "tracking.mode=disabled", "train.max_steps=12", "run_id=x",
                          "probe.warmup_steps=0", "probe.throughput_time_s=0.005", "probe.noise_batches=4"])
    data_prep.run(raw, str(tmp_path / "data"))
    if raw["probe"]["enabled"]:
        choice = probe.run(raw, str(tmp_path / "data"), str(tmp_path / "probe.json"), str(tmp_path / "run"))
        raw = with_batch_sizes(raw, choice["recommendation"]["effective_batch_size"],
                               choice["recommendation"]["micro_batch_size"])
    outcome = train_step.run(raw, str(tmp_path / "data"), str(tmp_path / "model.pt"), str(tmp_path / "run"))
    assert outcome["optimizer_steps"] == min(12, outcome["max_steps"])
    assert math.isfinite(outcome["best_metric"]["value"])
    assert parse_config(raw).train.batch_size == outcome["effective_batch_size"]


def test_steps_run_alone_from_the_command_line(tmp_path):
    """`python -m components.<step>`: the same steps without kfp, wired by files."""
    import json

    from components import data_prep, evaluate
    from components import train as train_step

    raw = config(train={"max_steps": 20}).to_dict()
    raw["run_id"] = "cli"
    (tmp_path / "c.json").write_text(json.dumps(raw))
    run = tmp_path / "run"
    data_prep.main(["--config", str(tmp_path / "c.json"), "--out", str(tmp_path / "data")])
    train_step.main(["--config", str(tmp_path / "c.json"), "--dataset", str(tmp_path / "data"),
                     "--model-out", str(tmp_path / "m.pt"), "--run-dir", str(run)])
    evaluate.main(["--config", str(tmp_path / "c.json"), "--dataset", str(tmp_path / "data"), "--model",
                   str(tmp_path / "m.pt"), "--train-result", str(run / "train_result.json"), "--run-dir", str(run)])
    summary = storage.read_json(run / "summary.json")
    assert summary["status"] == "completed" and summary["optimizer_steps"] == 20
    assert 0 < summary["test"]["accuracy"] <= 1


class OutOfMemoryAbove(torch.nn.Module):
    """An injected device-memory limit: a training forward raises the CUDA out-of-memory error type
    for micro-batches larger than `limit`, as a real allocator would (evaluation keeps no
    activations for backward: it is not limited here)."""

    def __init__(self, inner, limit):
        super().__init__()
        self.inner, self.limit, self.calls = inner, limit, []

    def forward(self, x):
        if not self.training:
            return self.inner(x)
        self.calls.append(len(x))
        if len(x) > self.limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {len(x)} samples")
        return self.inner(x)


def test_out_of_memory_halves_the_micro_batch_and_keeps_the_update(digits, tmp_path):
    # noise tracking off: its measuring steps run as two halves, another retry sequence
    cfg = config(train={"batch_size": 32, "micro_batch_size": 32, "max_steps": 30, "track_noise_scale": False},
                 eval={"every_steps": 30})
    clean, _ = train(cfg, digits)

    torch.manual_seed(cfg.train.seed)
    model = OutOfMemoryAbove(models.build_model(cfg.model, digits.input_shape, 10), limit=10)
    result = training.fit(model, digits, cfg, tmp_path, progress=False)

    assert result.oom_events == [{"step": 1, "from": 32, "to": 16}, {"step": 1, "from": 16, "to": 8}]
    assert model.calls[:4] == [32, 16, 8, 8]  # the retry sequence, then 4 micro-batches of 8
    assert (result.micro_batch_size, result.accumulation_steps) == (8, 4)
    assert result.effective_batch_size == 32 and result.samples_seen == 32 * 30  # never silently changed
    torch.testing.assert_close(params(model.inner), params(clean), rtol=1e-5, atol=1e-6)
    events = [r for r in storage.read_jsonl(tmp_path / "metrics.jsonl") if r.get("event") == "out_of_memory"]
    assert [(e["micro_batch_size"], e["accumulation_steps"]) for e in events] == [(16, 2), (8, 4)]


def test_out_of_memory_at_micro_batch_one_is_raised(digits):
    cfg = config(train={"batch_size": 4, "micro_batch_size": 4, "max_steps": 3, "track_noise_scale": False})
    torch.manual_seed(0)
    model = OutOfMemoryAbove(models.build_model(cfg.model, digits.input_shape, 10), limit=0)
    with pytest.raises(torch.OutOfMemoryError):
        training.fit(model, digits, cfg, progress=False)
    assert model.calls == [4, 2, 1]


def test_noise_scale_is_tracked_from_accumulation_micro_steps(digits, tmp_path):
    cfg = config(train={"batch_size": 128, "micro_batch_size": 32, "max_steps": 60, "lr_scaling": "none"},
                 eval={"every_steps": 20})
    _, result = train(cfg, digits, tmp_path)
    evals = [r for r in storage.read_jsonl(tmp_path / "metrics.jsonl") if "val/loss" in r]
    assert all("gns/b_simple" in r for r in evals)
    assert result.gns_b_simple == evals[-1]["gns/b_simple"]
    assert 1 < result.gns_b_simple < 10_000  # a batch-size scale, not noise or a sign error


def test_the_noise_scale_is_measured_on_every_nth_step(digits, monkeypatch):
    measured = []
    real_update = noise_scale.NoiseScaleTracker.update
    monkeypatch.setattr(noise_scale.NoiseScaleTracker, "update",
                        lambda self, *args: measured.append(1) or real_update(self, *args))
    for every, expected in ((1, 60), (4, 15), (7, 9)):  # steps 0, 7, ..., 56 of 60
        measured.clear()
        train(config(train={"batch_size": 128, "micro_batch_size": 32, "max_steps": 60,
                            "noise_scale_every_steps": every}), digits)
        assert len(measured) == expected
    for micro, expected in ((32, 15), (128, 4)):  # by default every 4th step, every 16th without accumulation
        measured.clear()
        train(config(train={"batch_size": 128, "micro_batch_size": micro, "max_steps": 60}), digits)
        assert len(measured) == expected


class RecordingTracker:
    """Stands in for a W&B run: records what would be logged, as Tracker.log / log_train do."""

    def __init__(self, log_every_steps=None):
        self.log_every, self.rows = log_every_steps, []

    def log(self, row):
        self.rows.append(("eval", row))

    def log_train(self, row):
        if self.log_every and row["step"] % self.log_every == 0:
            self.rows.append(("train", row))


def test_an_offline_w_and_b_run_replayed_after_training_gets_what_live_logging_sends(digits, tmp_path):
    from components import tracking

    cfg = config(train={"max_steps": 60}, eval={"every_steps": 20})
    live = RecordingTracker(log_every_steps=25)
    train(cfg, digits, tmp_path, tracker=live)
    replayed = RecordingTracker(log_every_steps=25)
    tracking.replay(replayed, storage.read_jsonl(tmp_path / training.METRICS))
    assert [kind for kind, _ in live.rows] == ["eval", "train", "eval", "train", "eval"]
    assert replayed.rows == live.rows
    first_eval = live.rows[0][1]
    rows = storage.read_jsonl(tmp_path / training.METRICS)
    assert first_eval["train/loss"] == pytest.approx(sum(r["train/loss"] for r in rows if r.get("step", 0) <= 20
                                                         and "train/loss" in r) / 20)
