"""Mixed precision for the training loop and the probe's trial steps (train.precision).

fp32: no autocast, no scaler: the loop is what it was.
bf16: torch.autocast(dtype=bfloat16) around forward and loss. bf16 keeps fp32's exponent range,
      so gradients need no scaling; the weights, their gradients and the optimizer stay fp32.
fp16: autocast float16 plus torch.amp.GradScaler: the loss is multiplied by the scale before
      backward so that small gradients do not underflow fp16; a step whose gradients hold inf or
      NaN is skipped (the weights and optimizer state untouched) and the scale halved, and after
      2000 clean steps it doubles (GradScaler's defaults). The scaler's state is in checkpoints.

On CPU torch supports both (autocast "cpu" with either dtype, GradScaler("cpu")), so every path
runs and is tested here; most CPUs have no fp16 arithmetic, so fp16 there is slow: a way to check
a config before a GPU run, not a way to train. Evaluation stays fp32 (components/metrics.py).
"""

from contextlib import nullcontext
from typing import Optional

import torch
from torch import nn

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_NO_AUTOCAST = nullcontext()  # reusable: fp32 pays one no-op `with` per micro-batch


class Precision:
    """One run's precision: the autocast context, the gradient scaler (fp16 only) and its state."""

    def __init__(self, name: str, device: torch.device):
        self.name, self.dtype, self.device_type = name, DTYPES[name], torch.device(device).type
        self.scaler: Optional[torch.amp.GradScaler] = (torch.amp.GradScaler(self.device_type) if name == "fp16"
                                                       else None)

    def autocast(self):
        if self.dtype is None:
            return _NO_AUTOCAST
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """The optimizer step; False when the scaler skipped it (gradients not finite)."""
        if self.scaler is None:
            optimizer.step()
            return True
        before = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        return self.scaler.get_scale() >= before  # update() lowers the scale exactly when it skipped

    @property
    def scale(self) -> float:
        return self.scaler.get_scale() if self.scaler is not None else 1.0

    def unscaled_sq(self, squared_norm):
        """A squared gradient norm measured on scaled gradients, in the gradients' own units (the
        noise-scale estimate averages norms over steps whose scales differ)."""
        return squared_norm if self.scaler is None else squared_norm / self.scaler.get_scale() ** 2

    def state_dict(self) -> Optional[dict]:
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_state_dict(self, state: Optional[dict]) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


class Autocast(nn.Module):
    """`inner` whose forward runs under autocast: the probe's trial steps measure memory and
    throughput in the precision training will use. Parameters are inner's (no copies)."""

    def __init__(self, inner: nn.Module, precision: Precision):
        super().__init__()
        self.inner, self.precision = inner, precision

    def forward(self, x):
        with self.precision.autocast():
            out = self.inner(x)
        return out.float()  # the loss in fp32, as autocast computes it in training (cross-entropy, mse)


def for_trials(model: nn.Module, name: str, device: torch.device) -> nn.Module:
    """The probe's model: itself in fp32, else wrapped in Autocast."""
    return model if DTYPES[name] is None else Autocast(model, Precision(name, device))
