"""The pipeline graphs, built in one place.

train: resolve_data -> data_prep -> probe -> train -> evaluate -> promote (when registry.enabled); with
       platform.nodes > 1 train_job in train's place: a light pod that runs the training as a
       Kubeflow Trainer TrainJob on that many nodes and hands on the same outputs (components/trainjob_launch.py)
study: resolve_data -> data_prep -> probe -> study_plan -> study_run per batch size (fanned out) -> study_report
and after either, whatever became of it, finalize (a dsl.ExitHandler): a run that failed gets its
summary.json on the cluster too, where no submitter waits (components/finalize.py).

Parameters: config_json, the resolved config compiled in with no run id, and the typed ones a
person sets in the KFP UI (components/run_parameters.py: run_id, data_path, data_repo, data_rev,
target, batch_size, micro_batch_size), their defaults from the same config. resolve_data merges
them, checks the result and hands that one config to every later step. Each run's id is decided
when it runs (run_id, else KFP's job id, passed to every step that keeps files), so every run a
schedule starts gets its own outputs, checkpoints and W&B runs.

The rule for what is fixed when the pipeline is compiled and what each run reads (held by
tests/test_compiled_pipeline.py):
- compile time (COMPILE_TIME): what shapes the pods and the graph. platform.image (and its digest),
  the accelerators (platform.gpu: constants, never a parameter), the placement (platform.resources,
  node_selector, tolerations, retry), the Secrets' names (platform.secrets), and the graph's shape
  (pipeline, probe.enabled, registry.enabled, study.parallelism, platform.nodes: train or train_job).
  Changing one is compiling and submitting again (a new pipeline version); resolve_data refuses a config_json that disagrees.
- run time: everything else. The typed parameters, the rest of config_json, the run id and the
  data's revision (resolve_data resolves it on every run: a schedule's runs read the newest). The
  compiled spec is the same for all of them but for the parameters' defaults, so one pipeline
  version (pipelines/kubeflow.py: spec_digest) serves any of them.

A platform.image given by digest (name@sha256:...) is passed to every task as
CONVERGENCE_IMAGE_DIGEST, which lineage records (components/lineage.py: an image cannot know its
own digest).
"""

import json
from types import SimpleNamespace

from kfp import dsl, kubernetes

from components import run_parameters
from components.config import GPU_STEPS
from components.lineage import IMAGE_DIGEST_ENV
from components.placement import image_digest, pod_resources
from pipelines.steps import make_steps

TRAIN_PIPELINE = "convergence-train"
STUDY_PIPELINE = "convergence-study"


JOB_ID = dsl.PIPELINE_JOB_ID_PLACEHOLDER  # resolved by KFP (and by kfp's local runner) for each run

# Fixed when the pipeline is compiled (see the module's doc): the image, what the pods get, the graph's shape.
COMPILE_TIME = ("pipeline", "platform.image", "platform.gpu", "platform.resources", "platform.node_selector",
                "platform.tolerations", "platform.retry", "platform.secrets", "probe.enabled", "registry.enabled",
                "study.parallelism", "platform.nodes")


def build_pipeline(config: dict):
    """The pipeline that `config["pipeline"]` names, for a resolved config."""
    return {"train": train_pipeline, "study": study_pipeline}[config["pipeline"]](config)


def compiled_config(config: dict) -> str:
    """config_json's default in the compiled pipeline: never a run id (see the module's doc)."""
    return json.dumps({**config, "run_id": None})


def compile_time(config: dict) -> dict:
    """{key: value} of the COMPILE_TIME keys: resolve_data refuses a config_json that differs."""
    return {key: run_parameters.get(config, key) for key in COMPILE_TIME}


def parameter_defaults(config: dict) -> dict:
    """The compiled pipeline's parameters and their defaults: config_json and the typed ones
    (components/run_parameters.py), all from the resolved config, with no run id."""
    return {"config_json": compiled_config(config), **run_parameters.values_of({**config, "run_id": None})}


def run_arguments(config: dict) -> dict:
    """What a local run passes: its config and the typed parameters of it, its run id included."""
    return {"config_json": json.dumps(config), **run_parameters.values_of(config)}


def _pipeline(config: dict, steps, name: str, description: str, body):
    """A @dsl.pipeline over body(parameters) inside a dsl.ExitHandler (finalize), its signature the
    typed parameters with defaults from the config; every pipeline has the same ones."""
    d = parameter_defaults(config)

    def pipeline(config_json: str = d["config_json"], run_id: str = d["run_id"], data_path: str = d["data_path"],
                 data_repo: str = d["data_repo"], data_rev: str = d["data_rev"], target: str = d["target"],
                 batch_size: str = d["batch_size"], micro_batch_size: str = d["micro_batch_size"]):
        parameters = dict(config_json=config_json, run_id=run_id, data_path=data_path, data_repo=data_repo,
                          data_rev=data_rev, target=target, batch_size=batch_size, micro_batch_size=micro_batch_size)
        with dsl.ExitHandler(_finally(steps, config, parameters)):
            body(parameters)

    return dsl.pipeline(name=name, description=description)(pipeline)


def _steps(config: dict) -> SimpleNamespace:
    """The components in platform.image, each task placed as platform.* says (_place)."""
    steps = make_steps(config["platform"]["image"])

    def placed(step, component):
        return lambda **kwargs: _place(config["platform"], step, component(**kwargs))

    return SimpleNamespace(**{name: placed(name, component) for name, component in vars(steps).items()})


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


def step_order(config: dict) -> list:
    """The graph's steps in the order they run (what finalize reads the steps' notes by)."""
    head = ["resolve_data", "data_prep"] + (["probe"] if config["probe"]["enabled"] else [])
    if config["pipeline"] == "study":
        return head + ["study_plan", "study_run", "study_report"]
    return head + [_train_step(config), "evaluate"] + (["promote"] if config["registry"]["enabled"] else [])


def _train_step(config: dict) -> str:
    """train, or with platform.nodes > 1 train_job (its launcher; the TrainJob's pods get the GPUs)."""
    return "train_job" if config["platform"].get("nodes", 1) > 1 else "train"


def _finally(steps, config: dict, parameters: dict):
    """The exit handler's task: it runs after the graph whatever became of it (finalize; under kfp's
    local runner too), on the pipeline's own parameters."""
    task = steps.finalize(config_json=parameters["config_json"], run_id=parameters["run_id"], job_id=JOB_ID,
                          steps=step_order(config))
    return task.set_caching_options(False)  # it reads this run's notes


def _prepare_data(steps, config: dict, parameters: dict):
    """resolve_data -> data_prep: resolve_data merges the typed parameters into config_json, checks
    the result and gives it to every later step (its config_json output), with the data's version,
    resolved on every run (never cached). That version is an input of data_prep, so data_prep's cache
    key changes with the data, not only with the config."""
    resolved = steps.resolve_data(compiled=json.dumps(compile_time(config)), job_id=JOB_ID, **parameters)
    resolved.set_caching_options(False)
    config_json = resolved.outputs["config_json"]
    return resolved, config_json, steps.data_prep(config_json=config_json, data_source=resolved.outputs["data_source"])


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
    promote_enabled = config["registry"]["enabled"]

    def body(parameters: dict):
        resolved, config_json, prep = _prepare_data(steps, config, parameters)
        if probe_enabled:
            probe = _probe(steps, config_json, prep)
            batch, micro, decision = (probe.outputs[k] for k in ("batch_size", "micro_batch_size", "decision"))
        else:  # the run's config's numbers (resolve_data refuses 'auto' without the probe)
            batch, micro, decision = resolved.outputs["batch_size"], resolved.outputs["micro_batch_size"], ""
        train = getattr(steps, _train_step(config))(config_json=config_json, job_id=JOB_ID, batch_size=batch,
                                                    micro_batch_size=micro, dataset=prep.outputs["dataset"])
        evaluate = steps.evaluate(config_json=config_json, job_id=JOB_ID, train_result=train.outputs["Output"],
                                  probe_decision=decision, dataset=prep.outputs["dataset"],
                                  model=train.outputs["model"])
        for task in (train, evaluate):
            task.set_caching_options(False)  # they keep files in the run's store; train resumes from it
        if promote_enabled:
            promote = steps.promote(config_json=config_json, job_id=JOB_ID, evaluation=evaluate.outputs["Output"],
                                    dataset=prep.outputs["dataset"], model=train.outputs["model"])
            promote.set_caching_options(False)  # decides against the registry's champion of now

    return _pipeline(config, steps, TRAIN_PIPELINE, "data_prep -> probe -> train -> evaluate -> promote: the batch "
                     "that fits and is worth it, gradient accumulation, early stopping, champion/challenger", body)


def study_pipeline(config: dict):
    """The convergence study: the probe (when enabled) centres the batch ladder and sets the
    micro-batch; the plan's batch sizes fan out with ParallelFor (`study.parallelism` at once on
    a cluster), each task running its batch's LR search run by run (components/lr_search.py), and
    the report step collects their rows."""
    steps = _steps(config)
    probe_enabled = config["probe"]["enabled"]

    def body(parameters: dict):
        _, config_json, prep = _prepare_data(steps, config, parameters)
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

    return _pipeline(config, steps, STUDY_PIPELINE, "steps, samples and time to target across batch sizes; the "
                     "critical batch size; a report", body)
