"""Compose the Hydra config tree in conf/ once, on the schemas from components/config.py,
and hand a plain, resolved, validated dict to everything downstream."""

from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import yaml
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException, MissingConfigException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from components.config import Config, describe_omegaconf_error, parse_config
from components.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

ConfigStore.instance().store(name="schema", node=Config)


def _one_line(exc: BaseException) -> str:
    """Hydra wraps OmegaConf's error (which names the key) in a few lines of its own."""
    if isinstance(exc, MissingConfigException) and exc.options:
        group, _, name = exc.missing_cfg_file.rpartition("/")
        return f"{group}: no config named {name!r} (available: {', '.join(exc.options)})"
    cause = exc
    while cause is not None:
        if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
            return describe_omegaconf_error(cause)
        cause = cause.__cause__ or cause.__context__
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def compose_config(overrides: Optional[List[str]] = None, config_name: str = "config") -> dict:
    """conf/ + command-line overrides -> resolved, validated plain dict. One line on error."""
    overrides = list(overrides or [])
    refuse_hydra_settings(overrides)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(_one_line(exc)) from None
    finally:
        GlobalHydra.instance().clear()
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"{missing[0]}: required; set it on the command line, e.g. {missing[0]}=...")
    try:
        raw = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as exc:
        raise ConfigError(_one_line(exc)) from None
    refuse_keys_of_other_options(overrides, raw)
    return parse_config(raw).to_dict()


# Hydra's own settings (hydra.*) would be accepted and silently ignored: submit composes the
# config, it does not run a Hydra app (no run directory, launcher, sweeper or job logging).
_RUN_DIR = "use output_dir=... and run_id=... instead"
_SWEEP = "use pipeline=study to compare batch sizes"
_LOGS = "every task's log is in <output_dir>/<run_id>/pipeline.log"
_HYDRA_INSTEAD = {"hydra.run": _RUN_DIR, "hydra.sweep": _RUN_DIR, "hydra.output_subdir": _RUN_DIR,
                  "hydra.job.chdir": "steps never change directory; relative paths resolve where you run submit",
                  "hydra.mode": _SWEEP, "hydra/launcher": _SWEEP, "hydra/sweeper": _SWEEP,
                  "hydra.verbose": _LOGS, "hydra.job_logging": _LOGS, "hydra/job_logging": _LOGS,
                  "hydra.hydra_logging": _LOGS, "hydra/hydra_logging": _LOGS}


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def refuse_hydra_settings(overrides: List[str]) -> None:
    for override in overrides:
        key = _override_key(override)
        if key == "hydra" or key.startswith(("hydra.", "hydra/")):
            instead = next((v for k, v in _HYDRA_INSTEAD.items() if key == k or key.startswith(k + ".")),
                           "--help lists what can be set")
            raise ConfigError(f"{key}: Hydra's own settings have no effect here (submit composes the config "
                              f"without running a Hydra app); {instead}")


@lru_cache(maxsize=None)
def config_groups() -> Dict[str, Tuple[Tuple[str, ...], Optional[str]]]:
    """conf/'s groups: {group: (its options, the default option or None)}."""
    defaults = {}
    for entry in yaml.safe_load((CONF_DIR / "config.yaml").read_text()).get("defaults", []):
        if isinstance(entry, dict):
            (group, option), = entry.items()
            defaults[group.replace("optional ", "")] = option
    return {d.name: (tuple(sorted(p.stem for p in d.glob("*.yaml"))), defaults.get(d.name))
            for d in sorted(CONF_DIR.iterdir()) if d.is_dir()}


@lru_cache(maxsize=None)
def _option_keys(group: str) -> Dict[str, frozenset]:
    return {option: frozenset(yaml.safe_load((CONF_DIR / group / f"{option}.yaml").read_text()) or {})
            for option in config_groups()[group][0]}


def refuse_keys_of_other_options(overrides: List[str], raw: dict) -> None:
    """A key set on the command line that only other options of its group define means nothing
    for the chosen one (data.path with data=digits would train on digits): refuse it. Keys no
    option defines (model.factory, model.kwargs) apply to every option."""
    for override in overrides:
        group, _, key = _override_key(override).partition(".")
        if override.startswith("~") or not key or group not in config_groups() or not isinstance(raw.get(group), dict):
            continue
        options = _option_keys(group)
        chosen = raw[group].get("name")
        key = key.split(".", 1)[0]
        if chosen not in options or key in options[chosen]:
            continue
        users = [option for option, keys in options.items() if key in keys]
        if users:
            raise ConfigError(f"{group}.{key}: only used with {' or '.join(f'{group}={u}' for u in users)}; "
                              f"did you mean {group}={users[0]}?")
