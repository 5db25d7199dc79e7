"""The schemas of where and how each step runs on a cluster (platform.resources, retry,
tolerations, secrets), part of PlatformConfig in components/config.py; pipelines/graph.py applies
them to the compiled pipeline, components/trainjob.py to a TrainJob's pods, and
components/config_rules.py checks them."""

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

# The pipeline's steps, as its KFP tasks are named (pipelines/steps.py); the GPU steps are the ones
# that train or time (they get platform.gpu, platform.resources.heavy, node_selector, tolerations).
# train_job replaces train when platform.nodes > 1: a light pod launching a Kubeflow Trainer TrainJob
# whose pods get what train would (components/trainjob.py).
STEP_NAMES = ("resolve_data", "data_prep", "probe", "train", "train_job", "evaluate", "promote", "study_plan",
              "study_run", "study_report", "finalize")
GPU_STEPS = ("probe", "train", "study_run")
WAITS_FOR = {"train_job": "train"}  # a light step that lasts as long as another: it gets that one's timeout_s


def pod_resources(platform: dict, step: str) -> dict:
    """The step's requests, limits and timeout: its kind's (heavy for GPU_STEPS, else light) with
    platform.resources.steps.<step> over them. train_job waits for the TrainJob's training, so its
    timeout is train's (the TrainJob's activeDeadlineSeconds) unless it has its own."""
    resources = platform["resources"]
    pod = {**resources["heavy" if step in GPU_STEPS else "light"]}
    if step in WAITS_FOR:
        pod["timeout_s"] = pod_resources(platform, WAITS_FOR[step])["timeout_s"]
    return {**pod, **resources["steps"].get(step, {})}


def image_digest(image: str) -> Optional[str]:
    """"sha256:<hex>" of an image named by digest, else None."""
    return "sha256:" + image.split("@sha256:", 1)[1] if "@sha256:" in image else None


@dataclass
class PodResources:
    """A step pod's requests, limits and timeout on a cluster, as Kubernetes quantities (cpu "500m"
    or "2", memory "512Mi" or "16Gi"); null: not set. kfp's local runner ignores them."""

    cpu_request: Optional[str] = None
    cpu_limit: Optional[str] = None
    memory_request: Optional[str] = None
    memory_limit: Optional[str] = None
    timeout_s: Optional[int] = None  # the pod's activeDeadlineSeconds (kfp-kubernetes set_timeout)


@dataclass
class ResourcesConfig:
    light: PodResources = field(default_factory=PodResources)  # every step but the GPU steps
    heavy: PodResources = field(default_factory=PodResources)  # probe, train, study_run
    # Per step: PodResources keys over its kind's, e.g. {train: {memory_limit: 64Gi, timeout_s: 172800}}
    steps: Dict[str, Dict[str, Any]] = field(default_factory=dict)


@dataclass
class RetryConfig:
    """KFP's retry policy, on every step: a pod lost to preemption, a node or a flaky endpoint runs
    again (train resumes from its synced checkpoint). A step failing on bad input fails each time."""

    max_retries: int = 0
    backoff_s: int = 60  # seconds: the wait before the first retry
    backoff_factor: float = 2.0  # each next wait is this many times longer
    backoff_max_s: int = 600  # KFP's backoff_max_duration: the longest a task keeps being retried


@dataclass
class Toleration:
    key: Optional[str] = None  # the taint's key; null with operator Exists: every taint
    operator: str = "Equal"  # Equal or Exists
    value: Optional[str] = None  # with Equal
    effect: Optional[str] = None  # NoSchedule, PreferNoSchedule or NoExecute; null: any
    toleration_seconds: Optional[int] = None  # NoExecute only: evicted after this long


@dataclass
class SecretConfig:
    """A Kubernetes Secret whose keys become environment variables of the steps' pods
    (kfp-kubernetes use_secret_as_env). Only names are in the config and the compiled pipeline."""

    secret_name: str = ""
    env: Dict[str, str] = field(default_factory=dict)  # ENV_VAR: the key in the Secret
    optional: bool = False  # true: a missing Secret or key leaves the variable unset; false: the pod fails
    steps: Optional[List[str]] = None  # the steps that get it (STEP_NAMES); null: every step
