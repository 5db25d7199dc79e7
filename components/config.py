"""The config contract: dataclass schemas, parsing and hashing; the value rules are in
components/config_rules.py, the one place where values are validated.

Hydra composes `conf/` on top of these schemas (see pipelines/config.py), so a typo or a
wrong type fails at composition. Steps receive the resolved config as a plain dict and
call `parse_config`, which applies the same schema and `validate`, so a step run alone
(`python -m components.train ...`) is held to the same contract. No Hydra here.
"""

import difflib
import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from components.errors import ConfigError
from components.placement import (GPU_STEPS, STEP_NAMES, PodResources, ResourcesConfig, RetryConfig,  # noqa: F401
                                  SecretConfig, Toleration)

DATA_NAMES = ("digits", "synthetic", "file", "dvc")
DATA_FORMATS = ("csv", "parquet", "npz")
TASKS = ("classification", "regression")
MODEL_NAMES = ("mlp", "cnn")
OPTIMIZERS = ("sgd", "adamw")
LR_SCALINGS = ("none", "linear", "sqrt")
SCHEDULES = ("constant", "cosine")
MODES = ("max", "min")
TRACKING_MODES = ("offline", "online", "disabled")
PLATFORMS = ("local", "kubeflow")
SCHEDULE_ACTIONS = ("pause", "resume", "delete", "list")
PIPELINES = ("train", "study")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16", "fp16")  # train.precision (components/precision.py)
# What the evaluation computes, per task; `eval.monitor` must name one of these.
VAL_METRICS = {
    "classification": ("val/loss", "val/accuracy", "val/macro_f1"),
    "regression": ("val/loss", "val/mse", "val/mae", "val/r2"),
}
# What eval.monitor is when not given. Regression: val/r2, not val/mse. On a fixed validation
# split the two rank checkpoints identically (r2 = 1 - mse / var), but r2 has no units, so
# eval.target and eval.min_delta mean the same on every dataset (a study's target 0.95 is a
# fit quality, not a squared error in the user's units).
DEFAULT_MONITOR = {"classification": "val/accuracy", "regression": "val/r2"}
MODE_OF = {"val/loss": "min", "val/mse": "min", "val/mae": "min",
           "val/accuracy": "max", "val/macro_f1": "max", "val/r2": "max"}


@dataclass
class DataConfig:
    name: str = "digits"
    # file: a local path or s3://bucket/key; dvc: a path inside data.repo
    path: Optional[str] = None
    format: Optional[str] = None  # inferred from the path's suffix when null
    target: str = "target"
    # null: inferred from the target at data_prep (components/datasets.py: infer_task); digits and
    # synthetic data are classification unless synthetic says task=regression
    task: Optional[str] = None
    # each example's features reshaped to this (e.g. [1, 8, 8]: 64 pixel columns as an 8x8 image for
    # model=cnn); null: as stored
    input_shape: Optional[List[int]] = None
    # dvc only (components/dvc_source.py)
    repo: Optional[str] = None  # a local path or a git URL; null: this project's checkout
    rev: Optional[str] = None  # a branch, tag or commit; null: the repo's HEAD
    remote: Optional[str] = None  # the DVC remote to read from when the cache lacks the data; null: the default
    # The data's version (a DVC md5, a file's sha256, an S3 VersionId or ETag; for digits and synthetic a
    # hash of the dataset), resolved before data_prep (components/data_sources.py) and set here by every
    # step from the dataset's manifest. Set it yourself to refuse any other data.
    version: Optional[str] = None
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 0
    # synthetic only
    n_samples: int = 2000
    n_features: int = 20
    n_classes: int = 4
    noise: float = 1.0


@dataclass
class ModelConfig:
    name: str = "mlp"
    hidden_sizes: List[int] = field(default_factory=lambda: [128, 64])
    channels: List[int] = field(default_factory=lambda: [16, 32])
    dropout: float = 0.0
    # "package.module:function" called as function(input_shape=..., output_dim=..., **kwargs);
    # when set it replaces `name`.
    factory: Optional[str] = None
    kwargs: Dict[str, Any] = field(default_factory=dict)


AUTO = "auto"  # a batch size the probe step decides


@dataclass
class TrainConfig:
    # int or "auto". Effective (global) batch = micro-batch x accumulation x world size.
    batch_size: Any = AUTO
    micro_batch_size: Any = AUTO
    max_epochs: int = 30
    max_steps: Optional[int] = None
    optimizer: str = "sgd"
    momentum: float = 0.9  # sgd only
    lr: float = 0.05
    base_batch_size: int = 32  # the batch at which `lr` was tuned
    lr_scaling: str = "linear"
    warmup_steps: int = 0
    schedule: str = "constant"
    # Steps the cosine decay spans. null: the run's step limit. A study's capped search run keeps
    # its batch's budget here, so it is the uncapped run stopped early, not a faster decay.
    schedule_steps: Optional[int] = None
    weight_decay: float = 0.0
    seed: int = 0
    # A checkpoint every N seconds of training and/or every N steps (whichever comes first), and
    # always at the end and on Ctrl-C. By time, so a fast model does not spend its run writing
    # checkpoints (every 200 steps was every 40 ms on the digits MLP, ~3% of its training time)
    # and a slow one still loses at most a minute when its pod is preempted.
    checkpoint_every_s: Optional[float] = 60.0
    checkpoint_every_steps: Optional[int] = None
    device: str = "auto"
    # Track the gradient noise scale (gns/b_simple) from the accumulation micro-steps: two
    # gradient norms per measured step, no copies. Without accumulation a measured step runs its
    # batch as two halves (the same update), which costs a second forward/backward.
    track_noise_scale: bool = True
    # ...on every N-th optimizer step. null: every 4th with accumulation (each of the two norms
    # costs ~70 us on a 2-core CPU, 3% of a 2.2 ms step), every 16th without (the split step
    # cost ~2.2x a plain one on the digits MLP at batch 32). The moving average spans ~20 measurements.
    noise_scale_every_steps: Optional[int] = None
    # torch's intra-op threads. null: the CPUs this process may use (affinity mask and cgroup
    # quota, fewer if OMP_NUM_THREADS says so); a number overrides all of them (components/cpu.py).
    cpu_threads: Optional[int] = None
    # Processes training together on this machine: >1 runs the train step's training under
    # `torchrun --standalone --nproc-per-node=N` (gloo on CPU, NCCL on GPUs; components/launch.py),
    # each rank with usable CPUs / N threads. The world size (Config.world_size) is this locally;
    # with platform=kubeflow, platform.gpu.count (this for CPU pods) x platform.nodes. Not hashed:
    # the same effective batch trains the same model, so a run resumes with another world size.
    nproc: int = 1
    # fp32 | bf16 | fp16: torch.autocast around forward and loss; fp16 adds a gradient scaler
    # (torch.amp.GradScaler) whose overflowing steps are skipped (components/precision.py)
    precision: str = "fp32"


@dataclass
class EvalConfig:
    every_steps: Optional[int] = None  # null: once per epoch
    # null: follows the task (DEFAULT_MONITOR) and the monitor (MODE_OF), see for_dataset
    monitor: Optional[str] = None
    mode: Optional[str] = None
    patience: int = 5  # in evaluations
    min_delta: float = 0.0
    target: Optional[float] = None
    # false: record steps/samples/time to target and keep training (patience, budget). A study
    # with false compares fully trained models, which is what "large batches generalize worse" is about.
    stop_at_target: bool = True
    divergence_threshold: Optional[float] = None


@dataclass
class TrackingConfig:
    mode: str = "offline"
    project: str = "convergence-pipeline"
    entity: Optional[str] = None  # null: $WANDB_ENTITY, else the API key's default entity
    group: Optional[str] = None  # null: the run id; a schedule's runs get the schedule's name (submit)
    # The promote step's W&B Report of the group's history (components/wandb_review.py); needs
    # tracking.mode=online and WANDB_API_KEY, otherwise it is skipped in one line.
    report: bool = True
    # W&B gets one row per evaluation (with the train loss averaged since the last one);
    # set N to also send every N-th train row. Online, measured here: each extra wandb.log
    # call costs ~5 ms of training time (the W&B service competes for the CPU); offline the
    # rows are written after training. metrics.jsonl keeps every step either way.
    log_every_steps: Optional[int] = None


@dataclass
class ProbeConfig:
    enabled: bool = True
    memory_margin: float = 0.1  # keep this fraction of device memory free
    # What "fits" means on CPU: the memory one micro-step needs (parameters, gradients,
    # optimizer state, inputs and the activations autograd saves) within this budget.
    # null: a quarter of RAM on CPU, the device's memory on CUDA; a number caps either.
    memory_budget_gb: Optional[float] = None
    max_micro_batch_size: int = 4096
    min_batch_size: int = 8  # smallest effective batch worth considering
    # Throughput ladder (components/throughput.py): seconds timed per micro-batch, cut into
    # blocks whose median and interquartile range are kept; a ladder that is slower at a larger
    # micro-batch beyond that spread is re-measured up to `throughput_remeasure` times.
    throughput_time_s: float = 0.02
    throughput_remeasure: int = 2
    noise_batches: int = 32  # big batches averaged for the noise scale, one a training step after the warm-up
    noise_accumulation: int = 4  # big batch = small batch x this
    warmup_steps: int = 50  # steps of training before the noise scale is measured (0: at init)


@dataclass
class StudyConfig:
    """The convergence study (pipeline=study): runs that differ only in the effective batch (and
    its LR), each trained until eval.target or its budget; then the fit of the critical batch."""

    # Effective batch sizes to compare. null: powers of two around the probe's recommendation,
    # `ladder_doublings` each way, from probe.min_batch_size up to half the training split.
    batch_sizes: Optional[List[int]] = None
    ladder_doublings: int = 3
    seeds: int = 1  # repeats per batch size and LR tried: train.seed, train.seed + 1, ...
    confirm_seeds: int = 2  # more seeds at each batch's chosen LR, which is then chosen again on medians
    # Multipliers of the scaled LR tried at every batch size: re-tuning the LR per batch is what
    # makes the comparison fair. The multiplier reaching the target in the fewest steps represents
    # its batch (components/lr_search.py). null: only the LR that train.lr_scaling gives.
    lr_grid: Optional[List[float]] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    # noise_scale: with SGD and the probe, centre each batch's grid on the LR the gradient noise
    # scale predicts (it saturates above B_noise; the linear rule does not). rule: on the rule's LR.
    lr_centre: str = "noise_scale"
    lr_extensions: int = 3  # best multiplier at an edge of the grid: one more step past it, this often at most
    divergence_retries: int = 2  # every LR tried diverged: half the lowest, this often at most
    # A search run stops at this multiple of the fewest steps to target found at its batch so
    # far (past it, it cannot be chosen). null: every run goes to the target or its budget.
    search_step_cap: Optional[float] = 1.25
    max_epochs: int = 30  # budget of each run (replaces train.max_epochs)
    max_steps: Optional[int] = None
    # Steps to target are measured at evaluations: a run evaluates every
    # max(1, round(expected steps / evals_to_target)) steps, and is run again more finely when
    # that left its steps to target known only to worse than step_precision.
    evals_to_target: int = 40
    step_precision: float = 0.05
    parallelism: int = 4  # runs at once on a cluster; kfp's local runner runs them one by one


@dataclass
class GpuConfig:
    type: str = "nvidia.com/gpu"  # the accelerator resource the probe and train pods request
    count: int = 0  # 0: CPU pods


@dataclass
class PlatformConfig:
    name: str = "local"
    image: str = "convergence-pipeline:latest"
    gpu: GpuConfig = field(default_factory=GpuConfig)
    # platform=kubeflow: submission to a KFP v2 server (pipelines/kubeflow.py, conf/platform/kubeflow.yaml)
    host: Optional[str] = None  # the KFP API, e.g. https://kubeflow.example.com/pipeline
    ui_host: Optional[str] = None  # where the printed links point; null: host
    namespace: Optional[str] = None  # the profile namespace of a multi-user KFP; null: single-user
    experiment: str = "convergence-pipeline"
    # Credentials, the first that is present: a bearer token in $token_env, a session cookie
    # ("name=value") in $cookie_env, the service-account token file kfp reads in a pod.
    token_env: str = "KFP_TOKEN"
    cookie_env: str = "KFP_COOKIE"
    request_timeout_s: float = 10.0  # the first call (healthz): an unreachable host fails this fast
    wait: bool = False  # follow the run to SUCCEEDED, FAILED, SKIPPED or CANCELED
    wait_timeout_s: float = 21600.0
    poll_interval_s: float = 15.0
    dry_run: bool = False  # print what would be sent; contact nothing
    # A 6-field cron, seconds first ("0 0 3 * * *": 03:00 every day, in the scheduler's time zone)
    schedule: Optional[str] = None
    schedule_name: Optional[str] = None  # null: <pipeline>-schedule; the same name replaces it
    schedule_action: Optional[str] = None  # pause, resume, delete or list the named schedule
    # Placement on a cluster (pipelines/graph.py; conf/platform/kubeflow.yaml sets them): per step
    # kind, requests, limits and a timeout; the GPU steps' nodes; retries; Secrets by name.
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    node_selector: Dict[str, str] = field(default_factory=dict)  # node labels the GPU steps need
    tolerations: List[Toleration] = field(default_factory=list)  # taints the GPU steps' pods tolerate
    retry: RetryConfig = field(default_factory=RetryConfig)
    secrets: List[SecretConfig] = field(default_factory=list)
    # Machines training together (platform=kubeflow only): > 1 replaces the train step with train_job,
    # a light pod that runs the training as a Kubeflow Trainer TrainJob of this many nodes, each with
    # platform.gpu.count GPUs (train.nproc ranks on CPU pods), and collects its outputs
    # (components/trainjob_launch.py). Needs Kubeflow Trainer v2.3 and RBAC for the launcher.
    nodes: int = 1
    # A TrainJob with no status condition after this long failed to start (its JobSet could not be
    # created: quota, admission, a missing runtime): the launcher fails, showing the JobSet and events.
    trainjob_start_timeout_s: float = 600.0
    # false: the launcher deletes the TrainJob (its JobSet and pods) once it ended and its status,
    # events and log tail are printed; true: kept for kubectl (delete it yourself; a retry reattaches).
    trainjob_keep: bool = False


@dataclass
class StorageConfig:
    """Where `output_dir=s3://bucket/prefix` goes (components/run_store.py, components/s3.py).
    Credentials are not here: they come from the standard AWS chain (env, ~/.aws, instance role)."""

    endpoint_url: Optional[str] = None  # null: AWS itself; MinIO or moto: http://host:port
    region: Optional[str] = None  # null: the AWS chain's (AWS_DEFAULT_REGION, ~/.aws/config)
    multipart_threshold_mb: int = 64  # files from this size upload in parts of this size (S3's minimum: 5)
    max_attempts: int = 5  # per request, the first included; botocore's "standard" retry mode backs off between
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0


@dataclass
class RegistryConfig:
    """The model registry (components/registry.py): the champion in use and every promotion
    decision; the promote step (components/promote.py) replaces the champion only when better."""

    enabled: bool = True  # false: the train pipeline has no promote step
    uri: Optional[str] = None  # a local directory or s3://bucket/prefix; null: <output_dir>/registry
    # How much better (in the monitored test metric's units, towards eval.mode) a new model must be
    # to replace the champion; 0: any improvement, a tie keeps the champion.
    min_improvement: float = 0.0
    wandb_artifact: str = "model"  # the W&B artifact every promoted/kept model is logged under


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    platform: PlatformConfig = field(default_factory=PlatformConfig)
    study: StudyConfig = field(default_factory=StudyConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    pipeline: str = "train"  # train: one run; study: compare batch sizes (conf/pipeline/)
    output_dir: str = "runs"  # a local path or s3://bucket/prefix; a run's files go to <output_dir>/<run_id>/
    # null: decided when the run starts (with_run_id); locally submit names a new one
    run_id: Optional[str] = None
    # Another run's location (<output_dir>/<run_id>, local or s3://) whose synced checkpoint this
    # run starts from, when it has none of its own; the config and data must be the same.
    resume_from: Optional[str] = None

    @property
    def nproc_per_node(self) -> int:
        """Ranks on each machine: train.nproc locally; on a cluster the train pod's GPUs (train.nproc for CPU
        pods). A study's runs train one process each (its study_run steps)."""
        if self.platform.name == "kubeflow" and self.platform.gpu.count and self.pipeline == "train":
            return self.platform.gpu.count
        return self.train.nproc

    @property
    def nodes(self) -> int:
        """Machines training together: platform.nodes on a cluster (a Kubeflow Trainer TrainJob), else 1."""
        return self.platform.nodes if self.platform.name == "kubeflow" else 1

    @property
    def world_size(self) -> int:
        """Processes training together; the effective batch is split over them."""
        return self.nproc_per_node * self.nodes

    @property
    def batch_sizes_decided(self) -> bool:
        return AUTO not in (self.train.batch_size, self.train.micro_batch_size)

    @property
    def accumulation_steps(self) -> int:
        if not self.batch_sizes_decided:
            raise ConfigError("train.batch_size: 'auto' is decided by the probe step; run it first "
                              "(probe.enabled=true) or give numbers")
        return self.train.batch_size // (self.train.micro_batch_size * self.world_size)

    def to_dict(self) -> dict:
        return asdict(self)


def describe_omegaconf_error(exc: OmegaConfBaseException) -> str:
    """One line naming the key, from OmegaConf's multi-line message."""
    key = getattr(exc, "full_key", None) or ""
    msg = str(getattr(exc, "msg", None) or exc).splitlines()[0].strip()
    if "not in struct" in msg or "Missing key" in msg or "not in '" in msg:
        parent, _, leaf = key.rpartition(".")
        return f"{key}: unknown key{_suggest(leaf, parent)}"
    return f"{key}: {msg}" if key else msg


def _suggest(leaf: str, parent: str) -> str:
    node: Any = Config()
    for part in filter(None, parent.split(".")):
        node = getattr(node, part, None)
    if node is None or not hasattr(node, "__dataclass_fields__"):
        return ""
    close = difflib.get_close_matches(leaf, list(node.__dataclass_fields__), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def parse_config(raw: dict) -> Config:
    """Plain dict -> typed, validated Config. Raises ConfigError with one line naming the key."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), raw)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise ConfigError(describe_omegaconf_error(exc)) from None
    resolve_task_defaults(cfg)
    from components.config_rules import validate  # the rules import the schemas above

    validate(cfg)
    return cfg


def known_task(data: DataConfig) -> Optional[str]:
    """The task the config alone decides: data.task, or digits' and synthetic data's own
    (synthetic generates classes unless told task=regression). A file's waits for its target."""
    if data.task is None and data.name in ("digits", "synthetic"):
        return "classification"
    return data.task


def resolve_task_defaults(cfg: Config) -> None:
    """Fill a null data.task, eval.monitor and eval.mode where the config alone decides them;
    for a file with data.task=null they stay null until data_prep has seen the target."""
    d, e = cfg.data, cfg.eval
    d.task = known_task(d)
    if e.monitor is None and d.task in DEFAULT_MONITOR:
        e.monitor = DEFAULT_MONITOR[d.task]
    if e.mode is None and e.monitor in MODE_OF:
        e.mode = MODE_OF[e.monitor]


def for_dataset(raw: dict, manifest: dict) -> dict:
    """The config dict with data.task, eval.monitor and eval.mode taken from the dataset
    artifact's manifest (what data_prep decided or inferred). Every step that loads the
    dataset calls this before parse_config. A config whose explicit data.task or eval.monitor
    contradicts the data is refused."""
    task = manifest["task"]
    data, ev = dict(raw.get("data") or {}), dict(raw.get("eval") or {})
    how = (f"inferred from the target {manifest.get('target')!r} of {manifest.get('origin')}"
           if manifest.get("task_inferred") else f"of {manifest.get('origin')}")
    if data.get("task") not in (None, task):
        raise ConfigError(f"data.task: the config says {data['task']} but the dataset is {task} ({how})")
    monitor = ev.get("monitor") or DEFAULT_MONITOR[task]
    if monitor not in VAL_METRICS[task]:
        hint = " (or set data.task)" if manifest.get("task_inferred") else ""
        raise ConfigError(f"eval.monitor: {monitor} is not computed for {task} ({how}); use one of "
                          f"{', '.join(VAL_METRICS[task])}{hint}")
    version = manifest.get("data_version")
    if version is not None:
        if data.get("version") not in (None, version):
            raise ConfigError(f"data.version: the config says {data['version']} but the dataset is {version} "
                              f"({manifest.get('origin')})")
        data["version"] = version
    data["task"] = task
    ev.update(monitor=monitor, mode=ev.get("mode") or MODE_OF[monitor])
    return {**raw, "data": data, "eval": ev}


def largest_divisor_at_most(n: int, limit: int) -> int:
    """The micro-batch for a batch of n when at most `limit` fit: it must divide n exactly."""
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def with_run_id(raw: dict, job_id: str) -> dict:
    """The run's identity, decided when it runs: the config's run_id when it names one (a local
    submit names every run; `run_id=<id>` resumes it), else the pipeline job's id, which KFP gives
    each run, so every run a schedule starts is a new run with its own outputs and W&B runs."""
    return raw if raw.get("run_id") else {**raw, "run_id": job_id}


def with_batch_sizes(raw: dict, batch_size: int, micro_batch_size: int) -> dict:
    """The config with the probe's decision in place of 'auto'."""
    return {**raw, "train": {**raw["train"], "batch_size": batch_size, "micro_batch_size": micro_batch_size}}


# Keys that change where or how a run is recorded, not what it computes.
_NOT_HASHED = ("run_id", "output_dir", "resume_from", "tracking", "platform", "storage", "registry")


# How many processes train (the same effective batch is the same training, so a run resumes with
# another world size), and keys hashed only when not at their default, so that runs checkpointed
# before the key existed still resume.
_TRAIN_NOT_HASHED = ("nproc",)
_TRAIN_HASHED_UNLESS = {"precision": "fp32", "schedule_steps": None}  # at these, hashes as before the key


# Where the data comes from: absolute paths of this machine, a branch that moves. Once the data's
# version is known (data.version: every step after data_prep) it stands for them.
_DATA_LOCATION = ("path", "repo", "rev", "remote")


def config_hash(cfg: Config) -> str:
    """Identity of what a run computes: same hash, same training. With data.version set, the same
    data and config hash the same from any checkout, machine or output_dir."""
    content = {k: v for k, v in cfg.to_dict().items() if k not in _NOT_HASHED}
    content["train"] = {k: v for k, v in content["train"].items()
                        if k not in _TRAIN_NOT_HASHED and _TRAIN_HASHED_UNLESS.get(k, object()) != v}
    if cfg.data.version is not None:
        content["data"] = {k: v for k, v in content["data"].items() if k not in _DATA_LOCATION}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def load_config_file(path: str) -> dict:
    """A resolved config saved as YAML or JSON (JSON is YAML)."""
    import yaml

    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except OSError as exc:
        raise ConfigError(f"--config: cannot read {path}: {exc.strerror}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"--config: {path} does not hold a mapping")
    return raw
