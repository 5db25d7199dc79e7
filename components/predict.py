"""Predictions from a saved model.pt, on raw features, in the target's own units.

model.pt (components/train.py) carries what the dataset artifact did to the data: the feature
normalization from the train split, the class labels, and for regression the target's mean and
std (training ran on the standardized target). A prediction undoes exactly that.

    from components.predict import Predictor
    predict = Predictor.load("runs/<id>/model.pt")
    predict(x)   # x: raw features (n, ...) as in the CSV/NPZ; -> class labels or target values
"""

from pathlib import Path

import numpy as np
import torch

from components.metrics import to_original_units


class Predictor:
    def __init__(self, model: torch.nn.Module, checkpoint: dict):
        self.model, self.checkpoint = model.eval(), checkpoint
        self.mean = np.asarray(checkpoint["normalization"]["mean"], dtype=np.float32)
        self.std = np.asarray(checkpoint["normalization"]["std"], dtype=np.float32)

    @classmethod
    def load(cls, path) -> "Predictor":
        from components.train import load_model

        model, checkpoint = load_model(Path(path))
        return cls(model, checkpoint)

    @torch.no_grad()
    def __call__(self, x) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        flat = (x.reshape(len(x), -1) - self.mean) / self.std
        out = self.model(torch.as_tensor(flat.reshape((len(x), *self.checkpoint["input_shape"]))))
        if self.checkpoint["task"] == "classification":
            return np.asarray(self.checkpoint["classes"])[out.argmax(dim=1).numpy()]
        return to_original_units(out.reshape(-1), self.checkpoint["target_scale"]).numpy()
