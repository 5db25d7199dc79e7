"""The pipeline graphs, built in one place.

train: resolve_data -> data_prep -> probe -> train -> evaluate -> promote (when registry.enabled)
study: resolve_data -> data_prep -> probe -> study_plan -> study_run per batch size (fanned out) -> study_report

The one parameter is the resolved config as JSON; its default is the config compiled in, with no
run id: each run's id is decided when it runs (KFP's job id, passed to every step that keeps
files), so every run a schedule starts gets its own outputs, checkpoints and W&B runs.

A platform.image given by digest (name@sha256:...) is passed to every task as
CONVERGENCE_IMAGE_DIGEST, which lineage records (components/lineage.py: an image cannot know its
own digest).
"""

import json
from types import SimpleNamespace
from typing import Optional

from kfp import dsl, kubernetes

from components.config import GPU_STEPS
from components.lineage import IMAGE_DIGEST_ENV
from pipelines.steps import make_steps

TRAIN_PIPELINE = "convergence-train"
STUDY_PIPELINE = "convergence-study"


JOB_ID = dsl.PIPELINE_JOB_ID_PLACEHOLDER  # resolved by KFP (and by kfp's local runner) for each run


def build_pipeline(config: dict):
    """The pipeline that `config["pipeline"]` names, for a resolved config."""
    return {"train": train_pipeline, "study": study_pipeline}[config["pipeline"]](config)


def compiled_config(config: dict) -> str:
    """config_json's default in the compiled pipeline: never a run id (see the module's doc)."""
    return json.dumps({**config, "run_id": None})


def image_digest(image: str) -> Optional[str]:
    """"sha256:<hex>" of an image named by digest, else None."""
    return "sha256:" + image.split("@sha256:", 1)[1] if "@sha256:" in image else None


def _steps(config: dict) -> SimpleNamespace:
    """The components in platform.image, each task placed as platform.* says (_place)."""
    steps = make_steps(config["platform"]["image"])

    def placed(step, component):
        return lambda **kwargs: _place(config["platform"], step, component(**kwargs))

    return SimpleNamespace(**{name: placed(name, component) for name, component in vars(steps).items()})


def pod_resources(platform: dict, step: str) -> dict:
    """The step's requests, limits and timeout: its kind's (heavy for GPU_STEPS, else light) with
    platform.resources.steps.<step> over them."""
    resources = platform["resources"]
    return {**resources["heavy" if step in GPU_STEPS else "light"], **resources["steps"].get(step, {})}


def _place(platform: dict, step: str, task):
    """Resources, timeout and retries on every task, platform.secrets on the steps they name;
    accelerators (constants: a count from a pipeline parameter compiles to a form older backends
    drop), node selectors and tolerations on the GPU steps; the image's digest. All carried in the
    compiled YAML; kfp's local runner ignores them (and honours retries)."""
    pod = pod_resources(platform, step)
    for key, setter in (("cpu_request", task.set_cpu_request), ("cpu_limit", task.set_cpu_limit),
                        ("memory_request", task.set_memory_request), ("memory_limit", task.set_memory_limit)):
        if pod[key] is not None:
            setter(str(pod[key]))
    if pod["timeout_s"]:
        kubernetes.set_timeout(task, pod["timeout_s"])
    if step in GPU_STEPS:
        if platform["gpu"]["count"]:
            task.set_accelerator_type(platform["gpu"]["type"]).set_accelerator_limit(platform["gpu"]["count"])
        for label, value in platform["node_selector"].items():
            kubernetes.add_node_selector(task, label, str(value))
        for toleration in platform["tolerations"]:
            kubernetes.add_toleration(task, **{k: v for k, v in toleration.items() if v is not None})
    retry = platform["retry"]
    if retry["max_retries"]:
        task.set_retry(num_retries=retry["max_retries"], backoff_duration=f"{retry['backoff_s']}s",
                       backoff_factor=retry["backoff_factor"], backoff_max_duration=f"{retry['backoff_max_s']}s")
    for secret in platform["secrets"]:  # names and keys only: the values stay in the cluster
        if secret["steps"] is None or step in secret["steps"]:
            for env, key in secret["env"].items():
                kubernetes.use_secret_as_env(task, secret["secret_name"], {key: env}, optional=secret["optional"])
    digest = image_digest(platform["image"])
    if digest is not None:
        task.set_env_variable(IMAGE_DIGEST_ENV, digest)
    return task


def _prepare_data(steps, config_json):
    """resolve_data -> data_prep. The data's version is resolved on every run (never cached) and is
    an input of data_prep, so data_prep's cache key changes with the data, not only with the config."""
    resolved = steps.resolve_data(config_json=config_json)
    resolved.set_caching_options(False)
    return steps.data_prep(config_json=config_json, data_source=resolved.output)


def _probe(steps, config_json, prep):
    probe = steps.probe(config_json=config_json, job_id=JOB_ID, dataset=prep.outputs["dataset"])
    probe.set_caching_options(False)  # measures this hardware now
    return probe


def train_pipeline(config: dict):
    """The training pipeline for a resolved config. The probe task exists when `probe.enabled`;
    otherwise the batch sizes come from the config as numbers. promote (registry.enabled) runs
    after evaluate has sealed the run: any decision is a success, so a diverged run (never
    promoted) still ends as the submitter reports it."""
    steps = _steps(config)
    probe_enabled = config["probe"]["enabled"]
    fixed = config["train"]
    promote_enabled = config["registry"]["enabled"]

    @dsl.pipeline(name=TRAIN_PIPELINE, description="data_prep -> probe -> train -> evaluate -> promote: the batch "
                  "that fits and is worth it, gradient accumulation, early stopping, champion/challenger")
    def pipeline(config_json: str = compiled_config(config)):
        prep = _prepare_data(steps, config_json)
        if probe_enabled:
            probe = _probe(steps, config_json, prep)
            batch, micro, decision = (probe.outputs[k] for k in ("batch_size", "micro_batch_size", "decision"))
        else:
            batch, micro, decision = fixed["batch_size"], fixed["micro_batch_size"], ""
        train = steps.train(config_json=config_json, job_id=JOB_ID, batch_size=batch, micro_batch_size=micro,
                            dataset=prep.outputs["dataset"])
        evaluate = steps.evaluate(config_json=config_json, job_id=JOB_ID, train_result=train.outputs["Output"],
                                  probe_decision=decision, dataset=prep.outputs["dataset"],
                                  model=train.outputs["model"])
        for task in (train, evaluate):
            task.set_caching_options(False)  # they keep files in the run's store; train resumes from it
        if promote_enabled:
            promote = steps.promote(config_json=config_json, job_id=JOB_ID, evaluation=evaluate.outputs["Output"],
                                    dataset=prep.outputs["dataset"], model=train.outputs["model"])
            promote.set_caching_options(False)  # decides against the registry's champion of now

    return pipeline


def study_pipeline(config: dict):
    """The convergence study: the probe (when enabled) centres the batch ladder and sets the
    micro-batch; the plan's batch sizes fan out with ParallelFor (`study.parallelism` at once on
    a cluster), each task running its batch's LR search run by run (components/lr_search.py), and
    the report step collects their rows."""
    steps = _steps(config)
    probe_enabled = config["probe"]["enabled"]

    @dsl.pipeline(name=STUDY_PIPELINE, description="steps, samples and time to target across batch sizes; "
                  "the critical batch size; a report")
    def pipeline(config_json: str = compiled_config(config)):
        prep = _prepare_data(steps, config_json)
        decision = _probe(steps, config_json, prep).outputs["decision"] if probe_enabled else ""
        plan = steps.study_plan(config_json=config_json, job_id=JOB_ID, probe_decision=decision,
                                dataset=prep.outputs["dataset"])
        plan.set_caching_options(False)  # its entries name this run's study id
        with dsl.ParallelFor(items=plan.output, parallelism=config["study"]["parallelism"]) as run:
            trained = steps.study_run(run_json=run, dataset=prep.outputs["dataset"])
            trained.set_caching_options(False)  # keeps its runs in the study's store; resumes from their checkpoints
        report = steps.study_report(config_json=config_json, job_id=JOB_ID, rows=dsl.Collected(trained.output),
                                    probe_decision=decision)
        report.set_caching_options(False)  # seals the study

    return pipeline
