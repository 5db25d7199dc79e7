"""train.precision on CPU (components/precision.py): bf16 autocast trains and resumes bit for bit;
fp16's gradient scaler skips an overflowing step, halves its scale and keeps it in the checkpoint;
the probe measures its trial steps in the chosen precision."""

import pytest
import torch

from components import data_prep, models, precision, probe, storage, training
from conftest import config

BASE = {"batch_size": 64, "micro_batch_size": 32, "optimizer": "sgd", "checkpoint_every_steps": None}


def build(digits, cfg, wrap=None):
    torch.manual_seed(cfg.train.seed)
    model = models.build_model(cfg.model, digits.input_shape, digits.output_dim)
    return wrap(model) if wrap else model


def flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_bf16_autocasts_the_forward_trains_digits_and_resumes_bit_for_bit(digits, tmp_path):
    cfg = config(train={**BASE, "precision": "bf16", "max_steps": 60}, eval={"every_steps": 20})
    model = build(digits, cfg)
    dtypes = set()
    model.register_forward_hook(lambda module, args, out: dtypes.add(out.dtype) if module.training else None)
    whole = training.fit(model, digits, cfg, tmp_path / "whole", progress=False)
    assert dtypes == {torch.bfloat16}  # the training forward ran under autocast; evaluation stays fp32
    assert whole.best_metric["value"] > 0.9 and whole.status == "completed"
    fp32 = build(digits, config(train={**BASE, "max_steps": 60}, eval={"every_steps": 20}))
    training.fit(fp32, digits, config(train={**BASE, "max_steps": 60}, eval={"every_steps": 20}), progress=False)
    assert not torch.equal(flat(fp32), flat(model))  # bf16 rounding shows: it is not an fp32 run

    def stop_at_30(step):
        if step == 30:
            raise KeyboardInterrupt  # Ctrl-C: a checkpoint after step 30

    with pytest.raises(KeyboardInterrupt):
        training.fit(build(digits, cfg), digits, cfg, tmp_path / "split", progress=False, on_step=stop_at_30)
    resumed_model = build(digits, cfg)
    resumed = training.fit(resumed_model, digits, cfg, tmp_path / "split", progress=False)
    assert resumed.resumed_from_step == 30 and resumed.optimizer_steps == 60
    assert torch.equal(flat(resumed_model), flat(model))  # bit for bit
    rows = [[{k: v for k, v in r.items() if k != "wall_time_s"} for r in storage.read_jsonl(d / training.METRICS)]
            for d in (tmp_path / "split", tmp_path / "whole")]
    assert rows[0] == rows[1] and len(rows[0]) == 60 + 3  # the same losses, evaluations and noise scale


class InfGradient(torch.autograd.Function):
    """Identity forward; backward gives inf gradients while `armed`."""

    armed = False

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf") if InfGradient.armed else grad


class Overflowing(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return InfGradient.apply(self.inner(x))


def test_fp16_skips_a_step_whose_gradients_overflow_and_halves_the_scale(digits, tmp_path):
    cfg = config(train={**BASE, "precision": "fp16", "max_steps": 12}, eval={"every_steps": 6})
    model = build(digits, cfg, Overflowing)
    params, scales = {0: flat(model)}, {}
    trainer = None

    def on_step(step):
        params[step], scales[step] = flat(model), trainer.precision.scale
        InfGradient.armed = step == 4  # the 5th step's backward overflows

    trainer = training.Trainer(model, digits, cfg, tmp_path, progress=False, on_step=on_step)
    assert trainer.precision.scaler is not None and trainer.precision.scale == 65536.0  # GradScaler's default
    try:
        result = trainer.fit()
    finally:
        InfGradient.armed = False
    assert torch.equal(params[5], params[4])  # skipped: the weights (and SGD's momentum) untouched
    assert all(not torch.equal(params[s], params[s - 1]) for s in range(1, 13) if s != 5)
    assert [scales[s] for s in (4, 5, 6)] == [65536.0, 32768.0, 32768.0]
    events = [r for r in storage.read_jsonl(tmp_path / training.METRICS) if r.get("event") == "skipped_step"]
    assert [(e["step"], e["loss_scale"]) for e in events] == [(5, 32768.0)]
    assert result.status == "completed" and result.optimizer_steps == 12 and torch.isfinite(params[12]).all()
    checkpoint = storage.load_torch(tmp_path / training.CHECKPOINT)
    assert checkpoint["precision"]["scale"] == 32768.0 and checkpoint["precision"]["_growth_tracker"] == 7

    again = training.Trainer(build(digits, cfg, Overflowing), digits, cfg, tmp_path, progress=False)
    assert again.precision.scale == 32768.0  # the scale resumes with the run


def test_fp32_has_no_autocast_or_scaler_and_fp16_norms_are_unscaled():
    assert precision.for_trials(torch.nn.Linear(2, 2), "fp32", torch.device("cpu")).__class__ is torch.nn.Linear
    p = precision.Precision("fp32", torch.device("cpu"))
    assert p.scaler is None and p.state_dict() is None and p.unscaled_sq(4.0) == 4.0
    fp16 = precision.Precision("fp16", torch.device("cpu"))
    assert fp16.unscaled_sq(65536.0 ** 2 * 3) == 3.0  # norms of scaled gradients, back in their own units


@pytest.fixture
def digits_artifact(tmp_path):
    raw = config(train={"batch_size": "auto", "micro_batch_size": "auto"}).to_dict()
    raw["probe"].update(warmup_steps=5, throughput_time_s=0.002, noise_batches=4, throughput_remeasure=0)
    raw["run_id"] = "p"
    data_prep.run(raw, str(tmp_path / "data"))
    return raw, tmp_path


def test_the_probe_measures_memory_and_throughput_in_the_chosen_precision(digits_artifact, monkeypatch):
    raw, tmp = digits_artifact
    measured = []
    real_ladder = probe.throughput_ladder
    monkeypatch.setattr(probe, "throughput_ladder", lambda model, *a, **k: measured.append(model) or real_ladder(
        model, *a, **k))
    results = {}
    for name in ("fp32", "bf16"):
        run = {**raw, "train": {**raw["train"], "precision": name}}
        results[name] = probe.run(run, str(tmp / "data"), str(tmp / f"{name}.json"), str(tmp / name))
    assert [type(m) for m in measured] == [torch.nn.Sequential, precision.Autocast]
    fp32, bf16 = (results[n]["memory"]["per_sample_bytes"] for n in ("fp32", "bf16"))
    assert bf16 < 0.8 * fp32  # the activations autograd saves are bf16
