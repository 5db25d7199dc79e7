"""The pipeline's typed parameters: what a person sets in the KFP UI for one run, beside config_json
(which carries everything else). pipelines/graph.py declares them with defaults from the resolved
config; the first step (resolve_data) merges them over config_json with `merge`, validates the
result, and hands that one config to every later step.

    name              config key              in the UI
    run_id            run_id                  "" : KFP's id of the run (each run of a schedule a new one)
    data_path         data.path               "" : null (data=file: a path or s3:// key; dvc: a path in data.repo)
    data_repo         data.repo               "" : null (dvc: this project's checkout)
    data_rev          data.rev                "" : null (dvc: the repo's HEAD, resolved when the run starts)
    target            eval.target             "" : no target, else a number
    batch_size        train.batch_size        "auto" (the probe decides) or a number
    micro_batch_size  train.micro_batch_size  "auto" or a number

All are strings in the compiled pipeline: kfp's local runner cannot run an optional parameter left
unset, and "auto" or "" are values the UI must take. A typed parameter wins over the same key in
config_json. Keys fixed when the pipeline was compiled
(pipelines/graph.py: COMPILE_TIME) are refused in config_json when they differ from the compiled ones.
"""

import json
import math
from typing import Optional

from components.config import AUTO, parse_config
from components.errors import ConfigError

# name -> config key; the strings' "" is the config's null
PARAMETERS = {"run_id": "run_id", "data_path": "data.path", "data_repo": "data.repo", "data_rev": "data.rev",
              "target": "eval.target", "batch_size": "train.batch_size",
              "micro_batch_size": "train.micro_batch_size"}
BATCH_PARAMETERS = ("batch_size", "micro_batch_size")
# what data.name reads them: a value set for another source would be silently unused
_USED_BY = {"data_path": ("file", "dvc"), "data_repo": ("dvc",), "data_rev": ("dvc",)}


def get(config: dict, dotted: str):
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node


def _with(config: dict, dotted: str, value) -> dict:
    head, _, rest = dotted.partition(".")
    return {**config, head: _with(config[head], rest, value) if rest else value}


def values_of(config: dict) -> dict:
    """The typed parameters' values for a config: strings, "" for null."""
    values = {}
    for name, key in PARAMETERS.items():
        value = get(config, key)
        values[name] = "" if value is None else repr(float(value)) if name == "target" else str(value)
    return values


def text(value) -> Optional[str]:
    """A string parameter as the config takes it: stripped, "" as null."""
    return str(value).strip() or None


def _batch(name: str, value: str):
    text = str(value).strip()
    if text == AUTO:
        return AUTO
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise ConfigError(f"{name}: 'auto' or a positive integer; got {value!r}")


def _target(value: str):
    text = str(value).strip()
    try:
        number = float(text) if text else None
    except ValueError:
        number = math.nan
    if number is not None and not math.isfinite(number):
        raise ConfigError(f"target: a number (the value of eval.monitor to reach) or empty for none; got {value!r}")
    return number


def merge(config_json: str, values: dict, compiled: Optional[dict] = None) -> dict:
    """config_json with the typed parameters over it, validated (components.config.parse_config);
    `compiled`: {dotted key: value} fixed at compile time, which config_json must agree with.
    One-line ConfigError naming the parameter or key."""
    try:
        config = json.loads(config_json)
    except ValueError as exc:
        raise ConfigError(f"config_json: not JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ConfigError("config_json: a JSON object of the resolved config (python -m pipelines.submit "
                          "--print-config shows one)")
    for key, value in (compiled or {}).items():
        try:
            given = get(config, key)
        except (KeyError, TypeError):
            given = None
        if given != value:
            raise ConfigError(f"{key}: fixed when the pipeline was compiled ({json.dumps(value)}), config_json says "
                              f"{json.dumps(given)}; compile and submit again to change it")
    unknown = set(values) - set(PARAMETERS)
    if unknown:
        raise ConfigError(f"pipeline parameter {sorted(unknown)[0]!r}: not one of {', '.join(PARAMETERS)}")
    data_name = (config.get("data") or {}).get("name")
    for name, value in values.items():
        if name in BATCH_PARAMETERS:
            value = _batch(name, value)
        elif name == "target":
            value = _target(value)
        else:
            value = text(value)
            if value is not None and name in _USED_BY and data_name not in _USED_BY[name]:
                raise ConfigError(f"{name}: data.name={data_name} reads no {PARAMETERS[name]} "
                                  f"(used with data.name={' or '.join(_USED_BY[name])}); leave it empty")
        config = _with(config, PARAMETERS[name], value)
    parse_config(config)  # the same contract as every step; one line naming the key
    return config
