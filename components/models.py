"""Model builders: the built-in MLP and CNN, or the user's own `model.factory`."""

import importlib
import inspect
import math
import sys
import traceback
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


def _user_code_failed(what: str, exc: BaseException) -> ConfigError:
    """The user's code raised: the whole traceback to stderr (the step's log), one line to raise."""
    traceback.print_exception(exc, file=sys.stderr)
    sys.stderr.flush()
    lines = str(exc).strip().splitlines()
    return ConfigError(f"model.factory: {what} raised {type(exc).__name__}" + (f": {lines[0]}" if lines else ""))


def load_factory(spec: str):
    module_name, _, func_name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"model.factory: cannot import {module_name!r}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - the module itself fails (SyntaxError, NameError, ...)
        raise _user_code_failed(f"importing {module_name}", exc) from None
    factory = getattr(module, func_name, None)
    if not callable(factory):
        raise ConfigError(f"model.factory: {module_name!r} has no function {func_name!r}")
    return factory


def call_factory(spec: str, input_shape: Tuple[int, ...], output_dim: int, kwargs: dict) -> nn.Module:
    """factory(input_shape=..., output_dim=..., **model.kwargs), with the user's mistakes as one
    line: arguments that do not fit its signature (checked before the call, so a TypeError from
    inside the factory is reported as raised, not as a wrong signature), or what it raised."""
    factory = load_factory(spec)
    for fixed in ("input_shape", "output_dim"):
        if fixed in kwargs:
            raise ConfigError(f"model.kwargs.{fixed}: the data decides it; remove it from model.kwargs")
    call = {"input_shape": tuple(input_shape), "output_dim": output_dim, **kwargs}
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # some builtins and C callables have none: just call
        signature = None
    if signature is not None:
        try:
            signature.bind(**call)
        except TypeError as exc:
            message, params = str(exc), signature.parameters
            takes_shapes = ({"input_shape", "output_dim"} <= params.keys()
                            or any(p.kind is p.VAR_KEYWORD for p in params.values()))
            if not takes_shapes:
                hint = " (it is called as factory(input_shape=..., output_dim=..., **model.kwargs))"
            elif "missing" in message:  # "missing a required argument: 'depth'"
                name = message.split(": ")[-1].strip("'")
                hint = f" (give it with +model.kwargs.{name}=...)"
            else:
                hint = " (model.kwargs)"
            raise ConfigError(f"model.factory: {spec}() {message}{hint}") from None
    try:
        return factory(**call)
    except Exception as exc:  # noqa: BLE001 - anything the user's code raises is theirs to see
        raise _user_code_failed(spec, exc) from None


def build_model(cfg: ModelConfig, input_shape: Tuple[int, ...], output_dim: int) -> nn.Module:
    if cfg.factory:
        model = call_factory(cfg.factory, input_shape, output_dim, cfg.kwargs)
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
    except Exception as exc:  # noqa: BLE001 - shape mismatches are RuntimeErrors; a user's forward may raise anything
        kind = "" if isinstance(exc, RuntimeError) else f"{type(exc).__name__}: "
        lines = str(exc).strip().splitlines()
        raise DataError(f"model {model_name(cfg)!r} cannot take inputs of shape {tuple(x_sample.shape[1:])}: "
                        f"{kind}{lines[0] if lines else type(exc).__name__}") from None
    if tuple(out.shape) not in {(len(x_sample), output_dim)} | ({(len(x_sample),)} if output_dim == 1 else set()):
        raise DataError(f"model {model_name(cfg)!r} returns shape {tuple(out.shape)}; expected "
                        f"({len(x_sample)}, {output_dim}) for this data")
