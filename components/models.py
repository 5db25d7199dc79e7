"""Model builders: the built-in MLP and CNN, or the user's own `model.factory`."""

import importlib
import math
from typing import Sequence, Tuple

import torch
from torch import nn

from components.config import ModelConfig
from components.errors import ConfigError, DataError


def mlp(input_shape: Sequence[int], output_dim: int, hidden_sizes=(128, 64), dropout: float = 0.0) -> nn.Module:
    layers, width = [nn.Flatten()], math.prod(input_shape)
    for hidden in hidden_sizes:
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = hidden
    layers.append(nn.Linear(width, output_dim))
    return nn.Sequential(*layers)


def cnn(input_shape: Sequence[int], output_dim: int, channels=(16, 32), dropout: float = 0.0) -> nn.Module:
    """Conv-ReLU blocks and a linear head. No batch norm, on purpose: with batch norm a
    micro-batch sees different statistics than the full batch, so gradient accumulation
    would no longer equal one big batch."""
    if len(input_shape) != 3:
        raise DataError(f"model.name=cnn needs image input (channels, height, width); the data has "
                        f"shape {tuple(input_shape)}. Use model=mlp, or npz images of shape (n, C, H, W)")
    layers, in_ch = [], input_shape[0]
    for out_ch in channels:
        layers += [nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1), nn.ReLU()]
        in_ch = out_ch
    layers += [nn.AdaptiveAvgPool2d(2), nn.Flatten()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(in_ch * 4, output_dim))
    return nn.Sequential(*layers)


def load_factory(spec: str):
    module_name, _, func_name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"model.factory: cannot import {module_name!r}: {exc}") from None
    factory = getattr(module, func_name, None)
    if not callable(factory):
        raise ConfigError(f"model.factory: {module_name!r} has no function {func_name!r}")
    return factory


def build_model(cfg: ModelConfig, input_shape: Tuple[int, ...], output_dim: int) -> nn.Module:
    if cfg.factory:
        model = load_factory(cfg.factory)(input_shape=tuple(input_shape), output_dim=output_dim, **cfg.kwargs)
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model.factory: {cfg.factory} returned {type(model).__name__}, not a torch.nn.Module")
        return model
    if cfg.name == "mlp":
        return mlp(input_shape, output_dim, cfg.hidden_sizes, cfg.dropout)
    return cnn(input_shape, output_dim, cfg.channels, cfg.dropout)


def model_name(cfg: ModelConfig) -> str:
    return cfg.factory or cfg.name


def check_fits(model: nn.Module, cfg: ModelConfig, x_sample: torch.Tensor, output_dim: int) -> None:
    """A forward pass on two examples: a shape mismatch fails here, before any training."""
    try:
        with torch.no_grad():
            out = model(x_sample)
    except RuntimeError as exc:
        raise DataError(f"model {model_name(cfg)!r} cannot take inputs of shape {tuple(x_sample.shape[1:])}: "
                        f"{str(exc).splitlines()[0]}") from None
    if tuple(out.shape) not in {(len(x_sample), output_dim)} | ({(len(x_sample),)} if output_dim == 1 else set()):
        raise DataError(f"model {model_name(cfg)!r} returns shape {tuple(out.shape)}; expected "
                        f"({len(x_sample)}, {output_dim}) for this data")
