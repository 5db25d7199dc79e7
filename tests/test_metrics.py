"""Evaluation metrics against scikit-learn's reference implementations."""

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from components import metrics


def test_classification_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    logits = torch.as_tensor(rng.normal(size=(200, 4)))
    y = torch.as_tensor(rng.integers(0, 4, 200))
    out = metrics.classification(logits, y, 4, full=True)
    pred = logits.argmax(1).numpy()
    assert out["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert out["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert out["loss"] == pytest.approx(skm.log_loss(y, torch.softmax(logits, 1).numpy()))
    assert out["confusion_matrix"] == skm.confusion_matrix(y, pred, labels=range(4)).tolist()


@pytest.mark.parametrize("n_classes", [2, 10, 15, 16, 100])
def test_the_validation_loss_is_cross_entropy_on_either_side_of_the_16_class_switch(n_classes):
    logits = torch.randn(300, n_classes, generator=torch.Generator().manual_seed(n_classes)) * 4
    y = torch.randint(n_classes, (300,), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(metrics.mean_cross_entropy(logits, y), torch.nn.functional.cross_entropy(logits, y))
    assert metrics.mean_cross_entropy(logits, y).item() == pytest.approx(
        skm.log_loss(y, torch.softmax(logits.double(), 1).numpy(), labels=range(n_classes)), rel=1e-5)


def test_macro_f1_counts_a_never_predicted_class_as_zero():
    logits = torch.tensor([[2.0, 0, 0], [2.0, 0, 0], [0, 2.0, 0]])
    y = torch.tensor([0, 2, 1])
    out = metrics.classification(logits, y, 3)
    assert out["macro_f1"] == pytest.approx(skm.f1_score(y, [0, 0, 1], average="macro", zero_division=0))


def test_regression_metrics_match_sklearn():
    rng = np.random.default_rng(1)
    y = torch.as_tensor(rng.normal(size=300))
    pred = y + torch.as_tensor(rng.normal(scale=0.3, size=300))
    out = metrics.regression(pred.reshape(-1, 1), y)
    assert out["mse"] == pytest.approx(skm.mean_squared_error(y, pred)) and out["loss"] == out["mse"]
    assert out["mae"] == pytest.approx(skm.mean_absolute_error(y, pred))
    assert out["r2"] == pytest.approx(skm.r2_score(y, pred))


@pytest.mark.parametrize("exact", [True, False])
def test_r2_of_a_constant_split_is_finite_as_in_sklearn(exact):
    y = torch.full((20,), 3.0, dtype=torch.float64)
    pred = y.clone() if exact else y + torch.linspace(-1, 1, 20, dtype=torch.float64)
    out = metrics.regression(pred, y, (10.0, 2.0))
    assert out["r2"] == skm.r2_score(y * 2 + 10, pred * 2 + 10) == (1.0 if exact else 0.0)


def test_to_original_units_inverts_the_standardization():
    scale = {"mean": 153.6, "std": 78.4}
    raw = np.array([25.0, 151.0, 346.0])
    standardized = (raw - scale["mean"]) / scale["std"]
    assert metrics.to_original_units(standardized, scale) == pytest.approx(raw)
    assert metrics.to_original_units(torch.as_tensor(standardized), (153.6, 78.4)).numpy() == pytest.approx(raw)
    assert metrics.to_original_units(torch.as_tensor(standardized), {"target_scale": scale}).numpy() == \
           pytest.approx(raw)
