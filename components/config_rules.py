"""The config's value rules: ranges and cross-field checks, each failing with one line that
starts with the key it is about. `components.config.parse_config` applies them to every config."""

import math
import re

from components.config import (AUTO, DATA_FORMATS, DATA_NAMES, DEVICES, LR_SCALINGS, MODE_OF, MODEL_NAMES, MODES,
                               OPTIMIZERS, PIPELINES, PLATFORMS, PRECISIONS, SCHEDULE_ACTIONS, SCHEDULES, TASKS,
                               TRACKING_MODES, VAL_METRICS, Config, PlatformConfig)
from components.errors import ConfigError


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _one_of(value, allowed, key: str) -> None:
    _check(value in allowed, key, f"must be one of {', '.join(allowed)}; got {value!r}")


def validate(cfg: Config) -> None:
    """Ranges and cross-field rules. Every message starts with the key it is about."""
    d, m, t, e = cfg.data, cfg.model, cfg.train, cfg.eval
    _one_of(d.name, DATA_NAMES, "data.name")
    if d.task is not None:  # null: inferred from the target at data_prep
        _one_of(d.task, TASKS, "data.task")
    if d.format is not None:
        _one_of(d.format, DATA_FORMATS, "data.format")
    if d.name in ("file", "dvc"):
        _check(bool(d.path), "data.path", f"required when data.name={d.name}")
    if d.name == "dvc":
        _check(not d.path.startswith("/") and "://" not in d.path, "data.path",
               f"with data.name=dvc, a path inside data.repo (e.g. data/train.csv); got {d.path!r}")
    _check(d.input_shape is None or (len(d.input_shape) > 0 and all(s > 0 for s in d.input_shape)),
           "data.input_shape", f"must be positive sizes or null; got {d.input_shape}")
    if d.name == "digits":
        _check(d.task in (None, "classification"), "data.task", "digits is a classification dataset")
    for key, frac in (("data.val_fraction", d.val_fraction), ("data.test_fraction", d.test_fraction)):
        _check(0 < frac < 1, key, f"must be in (0, 1); got {frac}")
    _check(d.val_fraction + d.test_fraction < 1, "data.val_fraction",
           f"val_fraction + test_fraction must leave a training split; got {d.val_fraction + d.test_fraction:g}")
    _check(d.n_samples > 0, "data.n_samples", f"must be > 0; got {d.n_samples}")
    _check(d.n_features > 0, "data.n_features", f"must be > 0; got {d.n_features}")
    _check(d.n_classes >= 2, "data.n_classes", f"must be >= 2; got {d.n_classes}")
    _check(d.noise >= 0, "data.noise", f"must be >= 0; got {d.noise}")

    if m.factory is None:
        _one_of(m.name, MODEL_NAMES, "model.name")
    else:
        module, _, func = m.factory.partition(":")
        _check(bool(module and func), "model.factory", f"must look like 'package.module:function'; got {m.factory!r}")
    _check(all(h > 0 for h in m.hidden_sizes), "model.hidden_sizes", f"sizes must be > 0; got {m.hidden_sizes}")
    _check(all(c > 0 for c in m.channels), "model.channels", f"sizes must be > 0; got {m.channels}")
    _check(0 <= m.dropout < 1, "model.dropout", f"must be in [0, 1); got {m.dropout}")

    for key in ("batch_size", "micro_batch_size"):
        value = getattr(t, key)
        _check(value == AUTO or (type(value) is int and value > 0), f"train.{key}",
               f"must be a positive integer or 'auto'; got {value!r}")
    for key in ("max_epochs", "base_batch_size"):
        value = getattr(t, key)
        _check(value > 0, f"train.{key}", f"must be > 0; got {value}")
    _check(type(t.nproc) is int and t.nproc >= 1, "train.nproc", f"must be an integer >= 1; got {t.nproc!r}")
    if cfg.pipeline == "study":  # each run's batch comes from the study; train.micro_batch_size caps its micro-batch
        _check(cfg.probe.enabled or bool(cfg.study.batch_sizes), "study.batch_sizes",
               "with probe.enabled=false, list the batch sizes to compare, e.g. study.batch_sizes=[16,64,256]")
    elif cfg.batch_sizes_decided:
        _check(t.micro_batch_size <= t.batch_size, "train.micro_batch_size",
               f"micro-batch {t.micro_batch_size} is larger than the effective batch {t.batch_size}")
        per_update = t.micro_batch_size * cfg.world_size
        _check(t.batch_size % per_update == 0, "train.batch_size",
               f"effective batch {t.batch_size} is not divisible by micro-batch x world size = {per_update}")
    else:
        _check(cfg.probe.enabled, "train.batch_size", "with probe.enabled=false, train.batch_size and "
               f"train.micro_batch_size must be numbers; got {t.batch_size!r} and {t.micro_batch_size!r}")
    _check(t.max_steps is None or t.max_steps > 0, "train.max_steps", f"must be > 0 or null; got {t.max_steps}")
    _check(t.schedule_steps is None or (type(t.schedule_steps) is int and t.schedule_steps > 0), "train.schedule_steps",
           f"must be a positive integer or null; got {t.schedule_steps!r}")
    _check(t.checkpoint_every_s is None or t.checkpoint_every_s > 0, "train.checkpoint_every_s",
           f"must be > 0 or null; got {t.checkpoint_every_s}")
    _one_of(t.optimizer, OPTIMIZERS, "train.optimizer")
    _one_of(t.lr_scaling, LR_SCALINGS, "train.lr_scaling")
    _one_of(t.schedule, SCHEDULES, "train.schedule")
    _one_of(t.device, DEVICES, "train.device")
    _check(t.lr > 0, "train.lr", f"must be > 0; got {t.lr}")
    _check(0 <= t.momentum < 1, "train.momentum", f"must be in [0, 1); got {t.momentum}")
    _check(t.warmup_steps >= 0, "train.warmup_steps", f"must be >= 0; got {t.warmup_steps}")
    _check(t.weight_decay >= 0, "train.weight_decay", f"must be >= 0; got {t.weight_decay}")
    _check(t.noise_scale_every_steps is None or t.noise_scale_every_steps > 0, "train.noise_scale_every_steps",
           f"must be > 0 or null; got {t.noise_scale_every_steps}")
    _check(t.checkpoint_every_steps is None or t.checkpoint_every_steps > 0, "train.checkpoint_every_steps",
           f"must be > 0 or null; got {t.checkpoint_every_steps}")
    _check(t.cpu_threads is None or t.cpu_threads > 0, "train.cpu_threads", f"must be > 0 or null; got {t.cpu_threads}")
    _one_of(t.precision, PRECISIONS, "train.precision")
    # a study's runs train in its study_run steps, one process each (components/study.py)
    _check(cfg.pipeline != "study" or t.nproc == 1, "train.nproc", "the study trains each of its runs in one "
           f"process; use train.nproc=1 with pipeline=study; got {t.nproc}")

    _check(e.every_steps is None or e.every_steps > 0, "eval.every_steps", f"must be > 0 or null; got {e.every_steps}")
    # null monitor/mode follow the task (resolve_task_defaults, for_dataset); the monitor is
    # checked against the task once both are known
    if e.monitor is not None:
        _one_of(e.monitor, VAL_METRICS[d.task] if d.task else tuple(MODE_OF), "eval.monitor")
    if e.mode is not None:
        _one_of(e.mode, MODES, "eval.mode")
    if e.monitor is not None and e.mode is not None:
        _check(e.mode == MODE_OF[e.monitor], "eval.mode", f"{e.monitor} improves towards "
               f"{'larger' if MODE_OF[e.monitor] == 'max' else 'smaller'} values; use eval.mode={MODE_OF[e.monitor]}")
    _check(e.patience > 0, "eval.patience", f"must be > 0; got {e.patience}")
    _check(e.min_delta >= 0, "eval.min_delta", f"must be >= 0; got {e.min_delta}")

    p = cfg.probe
    _check(0 <= p.memory_margin < 1, "probe.memory_margin", f"must be in [0, 1); got {p.memory_margin}")
    _check(p.memory_budget_gb is None or p.memory_budget_gb > 0, "probe.memory_budget_gb",
           f"must be > 0 or null; got {p.memory_budget_gb}")
    for key in ("max_micro_batch_size", "min_batch_size", "throughput_time_s"):
        _check(getattr(p, key) > 0, f"probe.{key}", f"must be > 0; got {getattr(p, key)}")
    _check(p.throughput_remeasure >= 0, "probe.throughput_remeasure", f"must be >= 0; got {p.throughput_remeasure}")
    _check(p.noise_batches >= 2, "probe.noise_batches", f"must be >= 2; got {p.noise_batches}")
    _check(p.noise_accumulation >= 2, "probe.noise_accumulation", f"must be >= 2; got {p.noise_accumulation}")
    _check(p.warmup_steps >= 0, "probe.warmup_steps", f"must be >= 0; got {p.warmup_steps}")

    s = cfg.study
    _one_of(cfg.pipeline, PIPELINES, "pipeline")
    if cfg.pipeline == "study":
        _check(e.target is not None, "eval.target", "the study measures steps to a target; set eval.target "
               f"(a value of {e.monitor or 'the monitored metric'} every batch size should reach)")
    _check(s.batch_sizes is None or (len(s.batch_sizes) > 0 and all(b > 0 for b in s.batch_sizes)),
           "study.batch_sizes", f"must be positive sizes or null; got {s.batch_sizes}")
    _check(s.lr_grid is None or (len(s.lr_grid) > 0 and all(m > 0 for m in s.lr_grid)), "study.lr_grid",
           f"must be positive multipliers or null; got {s.lr_grid}")
    for key in ("ladder_doublings", "seeds", "max_epochs", "evals_to_target", "parallelism"):
        _check(getattr(s, key) > 0, f"study.{key}", f"must be > 0; got {getattr(s, key)}")
    _one_of(s.lr_centre, ("noise_scale", "rule"), "study.lr_centre")
    for key in ("lr_extensions", "divergence_retries", "confirm_seeds"):
        _check(getattr(s, key) >= 0, f"study.{key}", f"must be >= 0; got {getattr(s, key)}")
    _check(s.search_step_cap is None or s.search_step_cap >= 1, "study.search_step_cap",
           f"must be >= 1 or null; got {s.search_step_cap}")
    _check(0 < s.step_precision < 1, "study.step_precision", f"must be in (0, 1); got {s.step_precision}")
    _check(s.max_steps is None or s.max_steps > 0, "study.max_steps", f"must be > 0 or null; got {s.max_steps}")

    _one_of(cfg.tracking.mode, TRACKING_MODES, "tracking.mode")
    _check(cfg.tracking.log_every_steps is None or cfg.tracking.log_every_steps > 0, "tracking.log_every_steps",
           f"must be > 0 or null; got {cfg.tracking.log_every_steps}")
    _one_of(cfg.platform.name, PLATFORMS, "platform.name")
    if cfg.platform.name == "kubeflow":
        validate_kubeflow(cfg.platform)
    _check(cfg.platform.gpu.count >= 0, "platform.gpu.count", f"must be >= 0; got {cfg.platform.gpu.count}")
    validate_nodes(cfg)
    validate_placement(cfg.platform)
    _check(bool(cfg.output_dir), "output_dir", "must not be empty")
    st = cfg.storage
    _check(st.endpoint_url is None or st.endpoint_url.startswith(("http://", "https://")), "storage.endpoint_url",
           f"must start with http:// or https:// (or be null for AWS); got {st.endpoint_url!r}")
    _check(st.multipart_threshold_mb >= 5, "storage.multipart_threshold_mb",
           f"must be >= 5 (S3's smallest part is 5 MiB); got {st.multipart_threshold_mb}")
    _check(st.max_attempts >= 1, "storage.max_attempts", f"must be >= 1; got {st.max_attempts}")
    for key in ("connect_timeout_s", "read_timeout_s"):
        _check(getattr(st, key) > 0, f"storage.{key}", f"must be > 0; got {getattr(st, key)}")
    reg = cfg.registry
    if reg.uri is not None:
        scheme = reg.uri.partition("://")[0] if "://" in reg.uri else ""
        _check(bool(reg.uri) and scheme in ("", "file", "s3"), "registry.uri",
               f"a local directory or s3://bucket/prefix (or null: <output_dir>/registry); got {reg.uri!r}")
    _check(math.isfinite(reg.min_improvement) and reg.min_improvement >= 0, "registry.min_improvement",
           f"must be a finite number >= 0; got {reg.min_improvement}")
    _check(re.fullmatch(r"[A-Za-z0-9_.-]+", reg.wandb_artifact) is not None, "registry.wandb_artifact",
           f"W&B artifact names take letters, digits, '-', '_' and '.'; got {reg.wandb_artifact!r}")
    if cfg.run_id is not None:
        _check(cfg.run_id.replace("-", "").replace("_", "").replace(".", "").isalnum(), "run_id",
               f"use letters, digits, '-', '_' and '.' only; got {cfg.run_id!r}")
        _check(cfg.run_id != "registry" or reg.uri is not None or not reg.enabled, "run_id",
               "registry is where the model registry lives (<output_dir>/registry, registry.uri null); "
               "choose another run_id")
    for key, uri in (("output_dir", cfg.output_dir), ("resume_from", cfg.resume_from)):
        scheme = str(uri).partition("://")[0] if uri and "://" in str(uri) else ""
        _check(scheme in ("", "file", "s3"), key, f"a local path or s3://bucket/prefix; got {uri!r}")
        # "s3:/bucket" (one slash) is a local directory named "s3:" to the OS: almost always a typo
        _check(not (uri and re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:/(?!/)", str(uri))), key,
               f"{uri!r} looks like a URI with one slash; write s3://bucket/prefix (or ./{uri} for a local directory)")


def validate_kubeflow(pf: PlatformConfig) -> None:
    """platform=kubeflow's keys. The cron itself is checked by pipelines/schedules.py before submit
    contacts the server (components never import pipelines)."""
    _check(bool(pf.host), "platform.host", "required with platform=kubeflow: the KFP API's URL, "
           "e.g. platform.host=https://kubeflow.example.com/pipeline")
    _check(pf.host.startswith(("http://", "https://")), "platform.host",
           f"must start with http:// or https://; got {pf.host!r}")
    _check(pf.ui_host is None or pf.ui_host.startswith(("http://", "https://")), "platform.ui_host",
           f"must start with http:// or https:// (or be null: the host); got {pf.ui_host!r}")
    if pf.namespace is not None:  # a Kubernetes namespace is a DNS label: a typo fails here, not as a 403
        allowed = set("abcdefghijklmnopqrstuvwxyz0123456789-")
        _check(0 < len(pf.namespace) <= 63 and set(pf.namespace) <= allowed and pf.namespace[0] != "-"
               and pf.namespace[-1] != "-", "platform.namespace",
               f"a Kubernetes namespace: lowercase letters, digits and '-', at most 63; got {pf.namespace!r}")
    _check(bool(pf.experiment.strip()), "platform.experiment", "must not be empty")
    for key in ("token_env", "cookie_env"):
        _check(bool(getattr(pf, key)), f"platform.{key}", "the name of an environment variable")
    for key in ("request_timeout_s", "wait_timeout_s", "poll_interval_s"):
        _check(getattr(pf, key) > 0, f"platform.{key}", f"must be > 0; got {getattr(pf, key)}")
    _check(pf.schedule_name is None or bool(pf.schedule_name.strip()), "platform.schedule_name",
           "must not be empty (null: <pipeline>-schedule)")
    if pf.schedule_action is not None:
        _one_of(pf.schedule_action, SCHEDULE_ACTIONS, "platform.schedule_action")
        _check(pf.schedule is None, "platform.schedule_action", "manages an existing schedule; "
               "platform.schedule creates or replaces one: set one of them")
    _check(not (pf.wait and (pf.schedule or pf.schedule_action)), "platform.wait",
           "a schedule starts its runs later, so there is no run to wait for")


def validate_nodes(cfg: Config) -> None:
    """platform.nodes > 1: a Kubeflow Trainer TrainJob (components/trainjob_launch.py), which needs a
    cluster, one training run and storage every node reaches."""
    pf = cfg.platform
    _check(type(pf.nodes) is int and pf.nodes >= 1, "platform.nodes", f"must be an integer >= 1; got {pf.nodes!r}")
    _check(pf.trainjob_start_timeout_s > 0, "platform.trainjob_start_timeout_s",
           f"must be > 0; got {pf.trainjob_start_timeout_s}")
    if pf.nodes > 1:
        _check(pf.name == "kubeflow", "platform.nodes", f"{pf.nodes} nodes train as a Kubeflow Trainer TrainJob: "
               "use platform=kubeflow (on one machine, train.nproc=N processes)")
        _check(cfg.pipeline == "train", "platform.nodes", "the study trains each of its runs in one study_run pod; "
               "use platform.nodes=1 with pipeline=study")
        _check(str(cfg.output_dir).startswith("s3://"), "platform.nodes", "the TrainJob's pods read their inputs "
               f"and write the run through output_dir: use s3://bucket/prefix; got {cfg.output_dir!r}")


_CPU = re.compile(r"([0-9]*[.])?[0-9]+m?")  # what kfp's set_cpu_* accept (kfp/dsl/pipeline_task.py)
_MEMORY = re.compile(r"([0-9]+)(E|Ei|P|Pi|T|Ti|G|Gi|M|Mi|K|Ki)?")  # and set_memory_*
_UNITS = {None: 1, **{u: 1000 ** (i + 1) for i, u in enumerate("KMGTPE")},
          **{u + "i": 1024 ** (i + 1) for i, u in enumerate("KMGTPE")}}
_TAINT_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SECRET_KEY = re.compile(r"[-._A-Za-z0-9]+")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def _quantity(value: str, key: str) -> float:
    """A Kubernetes cpu or memory quantity as a number (cores, bytes), or one line naming the key."""
    if key.endswith(("cpu_request", "cpu_limit")):
        _check(_CPU.fullmatch(value) is not None, key, f"a CPU quantity like 500m or 2; got {value!r}")
        return float(value[:-1]) / 1000 if value.endswith("m") else float(value)
    match = _MEMORY.fullmatch(value)
    _check(match is not None, key, f"a memory quantity like 512Mi or 16Gi; got {value!r}")
    return int(match.group(1)) * _UNITS[match.group(2)]


def _validate_pod(values: dict, key: str) -> None:
    for name in ("cpu", "memory"):
        request, limit = values.get(f"{name}_request"), values.get(f"{name}_limit")
        amounts = {k: _quantity(str(v), f"{key}.{name}_{k}") for k, v in (("request", request), ("limit", limit))
                   if v is not None}
        _check(len(amounts) < 2 or amounts["request"] <= amounts["limit"], f"{key}.{name}_request",
               f"{request} is more than the limit {limit}")
    timeout = values.get("timeout_s")
    _check(timeout is None or (type(timeout) is int and timeout > 0), f"{key}.timeout_s",
           f"seconds > 0 or null; got {timeout!r}")


def validate_placement(pf: PlatformConfig) -> None:
    """platform.resources, node_selector, tolerations, retry and secrets (pipelines/graph.py applies them)."""
    from dataclasses import asdict, fields

    from components.config import GPU_STEPS, STEP_NAMES, PodResources

    res = pf.resources
    for kind in ("light", "heavy"):
        _validate_pod(asdict(getattr(res, kind)), f"platform.resources.{kind}")
    pod_keys = [f.name for f in fields(PodResources)]
    for step, values in res.steps.items():
        _one_of(step, STEP_NAMES, "platform.resources.steps")
        _check(isinstance(values, dict), f"platform.resources.steps.{step}", f"a mapping of {', '.join(pod_keys)}")
        for name in values:
            _one_of(name, pod_keys, f"platform.resources.steps.{step}")
        kind = "heavy" if step in GPU_STEPS else "light"
        _validate_pod({**asdict(getattr(res, kind)), **values}, f"platform.resources.steps.{step}")
    for label, value in pf.node_selector.items():
        _check(bool(label) and value is not None, "platform.node_selector", f"label: value pairs; got {label}: {value}")
    for i, t in enumerate(pf.tolerations):
        key = f"platform.tolerations[{i}]"
        _one_of(t.operator, ("Equal", "Exists"), f"{key}.operator")
        _check(t.effect is None or t.effect in _TAINT_EFFECTS, f"{key}.effect",
               f"must be one of {', '.join(_TAINT_EFFECTS)} or null; got {t.effect!r}")
        _check(t.operator != "Exists" or t.value is None, f"{key}.value", "must be null with operator Exists")
        _check(t.key is not None or t.operator == "Exists", f"{key}.key", "null (every taint) needs operator Exists")
        _check(t.toleration_seconds is None or t.effect == "NoExecute", f"{key}.toleration_seconds",
               "only with effect NoExecute")
    r = pf.retry
    _check(r.max_retries >= 0, "platform.retry.max_retries", f"must be >= 0; got {r.max_retries}")
    for name in ("backoff_s", "backoff_max_s"):
        _check(getattr(r, name) >= 0, f"platform.retry.{name}", f"must be >= 0; got {getattr(r, name)}")
    _check(r.backoff_factor >= 1, "platform.retry.backoff_factor", f"must be >= 1; got {r.backoff_factor}")
    for i, secret in enumerate(pf.secrets):
        key = f"platform.secrets[{i}]"
        _check(len(secret.secret_name) <= 253 and _DNS_SUBDOMAIN.fullmatch(secret.secret_name) is not None,
               f"{key}.secret_name", f"a Kubernetes Secret's name (lowercase, digits, '-', '.'); "
               f"got {secret.secret_name!r}")
        _check(bool(secret.env), f"{key}.env", "map at least one ENV_VAR to a key of the Secret")
        for env, secret_key in secret.env.items():
            _check(_ENV_NAME.fullmatch(env) is not None, f"{key}.env", f"{env!r} is not an environment variable name")
            _check(_SECRET_KEY.fullmatch(str(secret_key)) is not None, f"{key}.env.{env}",
                   f"a key of the Secret (letters, digits, '-', '_', '.'); got {secret_key!r}")
        for step in secret.steps or ():
            _one_of(step, STEP_NAMES, f"{key}.steps")
