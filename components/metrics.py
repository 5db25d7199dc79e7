"""Evaluation metrics, shared by validation during training and the test evaluation.

A regression target is standardized at data_prep (its train-split mean and std are the
dataset's `target_scale`): the model predicts and trains on (y - mean) / std. `loss` is the
MSE the model trains on, in those standardized units; mse, mae and r2 are in the target's own
units (r2 is the same in both).
"""

from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn


def loss_fn(task: str):
    return F.cross_entropy if task == "classification" else _mse


def mean_cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """F.cross_entropy's value. On CPU, log_softmax over fewer than 16 classes runs a slow path
    (~0.1 us a row at 10 classes: 30 us of a 190 us validation of digits); over the transposed
    copy, one class per row, it is vectorized (10 us). From 16 classes on the direct one is faster."""
    if logits.device.type == "cpu" and logits.dim() == 2 and logits.shape[1] < 16:
        return F.nll_loss(logits.t().contiguous().log_softmax(0).t(), y)
    return F.cross_entropy(logits, y)


def _mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(pred.reshape(target.shape), target)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    was_training = model.training
    model.eval()
    outs = [model(x[i:i + chunk]) for i in range(0, len(x), chunk)]
    model.train(was_training)
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def classification(logits: torch.Tensor, y: torch.Tensor, n_classes: int, full: bool = False) -> Dict:
    pred = logits.argmax(dim=1)
    # pred + y * k in one op: every op here is ~5-15 us of dispatch, and validation runs every epoch
    confusion = torch.bincount(pred.add(y, alpha=n_classes), minlength=n_classes * n_classes).reshape(n_classes, n_classes)
    # Validation runs every epoch: per-class arithmetic in Python on three k-vectors costs less
    # than a dozen tiny tensor ops (each ~15 us of dispatch on CPU).
    tp, support, predicted = torch.stack([confusion.diag(), confusion.sum(dim=1), confusion.sum(dim=0)]).tolist()
    # F1 = 2PR / (P + R) = 2 tp / (support + predicted); 0 for a class never seen nor predicted
    f1 = [2 * t / (s + p) if s + p else 0.0 for t, s, p in zip(tp, support, predicted)]
    out = {
        "loss": mean_cross_entropy(logits, y).item(),
        "accuracy": sum(tp) / len(y),
        "macro_f1": sum(f1) / n_classes,
    }
    if full:
        out["confusion_matrix"] = confusion.tolist()  # rows: true class, columns: predicted
    return out


TargetScale = Union[None, Sequence[float], Dict]


def _scale(target_scale: TargetScale) -> Optional[Tuple[float, float]]:
    """(mean, std) from (mean, std), {"mean", "std"} (Dataset.target_scale), or a whole manifest."""
    if target_scale is None:
        return None
    if isinstance(target_scale, dict):
        if "target_scale" in target_scale:  # a dataset manifest
            return _scale(target_scale["target_scale"])
        return float(target_scale["mean"]), float(target_scale["std"])
    mean, std = target_scale
    return float(mean), float(std)


def to_original_units(pred, target_scale: TargetScale):
    """A regression model's output (standardized) in the target's own units: pred * std + mean.
    Takes a tensor or an array; target_scale as in `evaluate` (None: returned unchanged)."""
    scale = _scale(target_scale)
    return pred if scale is None else pred * scale[1] + scale[0]


def regression(pred: torch.Tensor, y: torch.Tensor, target_scale: TargetScale = None) -> Dict:
    """`pred` and `y` as the model sees them (standardized when target_scale is given)."""
    pred = pred.reshape(y.shape).double()
    y = y.double()
    loss = ((pred - y) ** 2).mean().item()  # the training loss: in standardized units
    pred, y = to_original_units(pred, target_scale), to_original_units(y, target_scale)
    err = pred - y
    mse = (err ** 2).mean().item()
    var = ((y - y.mean()) ** 2).mean().item()
    return {
        "loss": loss,
        "mse": mse,
        "mae": err.abs().mean().item(),
        # a constant split has no variance to explain: 1 for exact predictions, else 0, as
        # scikit-learn's r2_score does (force_finite); never NaN
        "r2": 1.0 - mse / var if var > 0 else float(mse == 0),
    }


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, task: str, n_classes: int = 0,
             prefix: str = "val", full: bool = False, chunk: int = 4096, target_scale: TargetScale = None) -> Dict:
    """Metrics of `model` on (x, y) under `prefix/`. Regression: pass the dataset's
    target_scale so that mse, mae and r2 come in the target's own units."""
    out = predict(model, x, chunk)
    values = (classification(out, y, n_classes, full) if task == "classification"
              else regression(out, y, target_scale))
    return {f"{prefix}/{k}": v for k, v in values.items()}
