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
    out = torch.cat([model(x[i:i + chunk]) for i in range(0, len(x), chunk)])
    model.train(was_training)
    return out


def classification(logits: torch.Tensor, y: torch.Tensor, n_classes: int, full: bool = False) -> Dict:
    pred = logits.argmax(dim=1)
    confusion = torch.bincount(y * n_classes + pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes)
    tp = confusion.diag().double()
    precision = tp / confusion.sum(dim=0).clamp(min=1)
    recall = tp / confusion.sum(dim=1).clamp(min=1)
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall), torch.zeros_like(tp))
    out = {
        "loss": F.cross_entropy(logits, y).item(),
        "accuracy": (pred == y).double().mean().item(),
        "macro_f1": f1.mean().item(),
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
