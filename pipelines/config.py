"""Compose the Hydra config tree in conf/ once, on the schemas from components/config.py,
and hand a plain, resolved, validated dict to everything downstream."""

from pathlib import Path
from typing import List, Optional

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
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=list(overrides or []))
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
    return parse_config(raw).to_dict()
