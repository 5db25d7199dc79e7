"""Evaluation metrics, shared by validation during training and the test evaluation."""

from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn


def loss_fn(task: str):
    return F.cross_entropy if task == "classification" else _mse


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
    confusion = torch.bincount(y * n_classes + pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes)
    # Validation runs every epoch: per-class arithmetic in Python on three k-vectors costs less
    # than a dozen tiny tensor ops (each ~15 us of dispatch on CPU).
    tp, support, predicted = torch.stack([confusion.diag(), confusion.sum(dim=1), confusion.sum(dim=0)]).tolist()
    # F1 = 2PR / (P + R) = 2 tp / (support + predicted); 0 for a class never seen nor predicted
    f1 = [2 * t / (s + p) if s + p else 0.0 for t, s, p in zip(tp, support, predicted)]
    out = {
        "loss": F.cross_entropy(logits, y).item(),
        "accuracy": sum(tp) / len(y),
        "macro_f1": sum(f1) / n_classes,
    }
    if full:
        out["confusion_matrix"] = confusion.tolist()  # rows: true class, columns: predicted
    return out


def regression(pred: torch.Tensor, y: torch.Tensor) -> Dict:
    pred = pred.reshape(y.shape).double()
    y = y.double()
    err = pred - y
    mse = (err ** 2).mean().item()
    var = ((y - y.mean()) ** 2).mean().item()
    return {
        "loss": mse,
        "mse": mse,
        "mae": err.abs().mean().item(),
        "r2": 1.0 - mse / var if var > 0 else float("nan"),
    }


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, task: str, n_classes: int = 0,
             prefix: str = "val", full: bool = False, chunk: int = 4096) -> Dict:
    out = predict(model, x, chunk)
    values = classification(out, y, n_classes, full) if task == "classification" else regression(out, y)
    return {f"{prefix}/{k}": v for k, v in values.items()}
