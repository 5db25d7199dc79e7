"""The compiled pipeline as a cluster gets it (pipelines/graph.py): both YAML documents, the
pipeline spec and the platform (kfp-kubernetes) spec, for the train and study pipelines."""

import json

import pytest
import yaml
from kfp import compiler

from components.errors import ConfigError
from pipelines import graph
from pipelines.config import compose_config

KUBEFLOW = ["platform=kubeflow", "platform.host=http://127.0.0.1:9", "output_dir=s3://b/runs", "data=digits"]
STUDY = ["pipeline=study", "eval.target=0.9"]


def compile_docs(tmp_path, *overrides, name="pipeline.yaml"):
    """(pipeline spec, platform spec's executors) of the pipeline the overrides compose."""
    path = tmp_path / name
    compiler.Compiler().compile(graph.build_pipeline(compose_config([*KUBEFLOW, *overrides])), str(path))
    docs = list(yaml.safe_load_all(path.read_text()))
    assert len(docs) == 2
    return docs[0], docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def all_tasks(spec) -> dict:
    """Every task, in the root DAG and in the DAGs inside it (the exit handler's, ParallelFor's)."""
    found = dict(spec["root"]["dag"]["tasks"])
    for component in spec["components"].values():
        found.update(component.get("dag", {}).get("tasks", {}))
    return found


def containers(spec) -> dict:
    return {name[len("exec-"):]: e["container"] for name, e in spec["deploymentSpec"]["executors"].items()}


def test_gpu_steps_get_accelerators_heavy_resources_node_selectors_and_tolerations(tmp_path):
    spec, platform = compile_docs(tmp_path, "platform.gpu.count=2", "platform.gpu.type=nvidia.com/gpu",
                                  "++platform.node_selector={cloud.google.com/gke-accelerator: nvidia-l4}",
                                  "+platform.resources.steps.train.memory_limit=64Gi")
    pods = containers(spec)
    assert set(pods) == {"resolve-data", "data-prep", "probe", "train", "evaluate", "promote", "finalize"}
    for step, pod in pods.items():
        accelerator = pod["resources"].get("accelerator")
        if step in ("probe", "train"):
            assert (accelerator["resourceType"], accelerator["resourceCount"]) == ("nvidia.com/gpu", "2")
            assert platform[f"exec-{step}"]["nodeSelector"] == {
                "labels": {"cloud.google.com/gke-accelerator": "nvidia-l4"}}
            assert platform[f"exec-{step}"]["tolerations"] == [
                {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
            assert platform[f"exec-{step}"]["activeDeadlineSeconds"] == "86400"
        else:
            assert accelerator is None
            assert "nodeSelector" not in platform[f"exec-{step}"] and "tolerations" not in platform[f"exec-{step}"]
            assert platform[f"exec-{step}"]["activeDeadlineSeconds"] == "3600"
    quantities = {step: tuple(pod["resources"][k] for k in ("resourceCpuRequest", "resourceCpuLimit",
                                                           "resourceMemoryRequest", "resourceMemoryLimit"))
                  for step, pod in pods.items()}
    assert quantities == {"resolve-data": ("500m", "1", "1Gi", "2Gi"), "data-prep": ("500m", "1", "1Gi", "2Gi"),
                          "probe": ("2", "4", "8Gi", "16Gi"), "train": ("2", "4", "8Gi", "64Gi"),
                          "evaluate": ("500m", "1", "1Gi", "2Gi"), "promote": ("500m", "1", "1Gi", "2Gi"),
                          "finalize": ("500m", "1", "1Gi", "2Gi")}


def test_several_nodes_put_a_light_train_job_task_in_trains_place_and_change_nothing_else(tmp_path):
    gpus = ["platform.gpu.count=2", "++platform.node_selector={pool: gpu}"]
    one, one_platform = compile_docs(tmp_path, *gpus, name="one.yaml")
    two, two_platform = compile_docs(tmp_path, *gpus, "platform.nodes=2", name="two.yaml")
    pods, one_pods = containers(two), containers(one)
    assert set(pods) == set(one_pods) - {"train"} | {"train-job"}
    assert {k: v for k, v in pods.items() if k != "train-job"} == {k: v for k, v in one_pods.items() if k != "train"}
    # a light pod: no accelerator, no node selector or tolerations (the TrainJob's pods get them), the
    # light step's resources but train's timeout (it waits for the training), AWS only (no W&B key)
    job = pods["train-job"]
    assert "accelerator" not in job["resources"] and job["image"] == one_pods["train"]["image"]
    assert "trainjob_launch.run(config, dataset.path, model.path)" in job["command"][-1]
    assert [job["resources"][k] for k in ("resourceCpuLimit", "resourceMemoryLimit")] == ["1", "2Gi"]
    assert two_platform["exec-train-job"]["activeDeadlineSeconds"] == "86400"
    assert "nodeSelector" not in two_platform["exec-train-job"] and "tolerations" not in two_platform["exec-train-job"]
    assert [s["secretName"] for s in two_platform["exec-train-job"]["secretAsEnv"]] == ["aws-credentials"] * 2
    assert {k: v for k, v in two_platform.items() if k != "exec-train-job"} == {
        k: v for k, v in one_platform.items() if k != "exec-train"}
    tasks, one_tasks = all_tasks(two), all_tasks(one)
    assert tasks["train-job"]["inputs"] == one_tasks["train"]["inputs"]
    # evaluate and promote take train_job's outputs as they took train's
    for step in ("evaluate", "promote"):
        assert json.dumps(tasks[step]["inputs"]) == json.dumps(one_tasks[step]["inputs"]).replace('"train"',
                                                                                                  '"train-job"')
    assert tasks["finalize"]["inputs"]["parameters"]["steps"]["runtimeValue"]["constant"] == [
        "resolve_data", "data_prep", "probe", "train_job", "evaluate", "promote"]


def test_the_config_names_the_steps_the_pipelines_have():
    from components.config import GPU_STEPS, STEP_NAMES
    from pipelines.steps import make_steps

    assert set(vars(make_steps("img"))) == set(STEP_NAMES) and set(GPU_STEPS) < set(STEP_NAMES)


def test_every_task_retries_with_backoff_from_config(tmp_path):
    spec, _ = compile_docs(tmp_path, "platform.retry.max_retries=3", "platform.retry.backoff_s=30",
                           "platform.retry.backoff_factor=3", "platform.retry.backoff_max_s=900")
    policies = {name: task.get("retryPolicy") for name, task in all_tasks(spec).items() if "componentRef" in task
                and name in containers(spec)}
    assert set(policies) == set(containers(spec))
    assert all(p == {"maxRetryCount": 3, "backoffDuration": "30s", "backoffFactor": 3.0,
                     "backoffMaxDuration": "900s"} for p in policies.values()), policies


def test_the_study_places_each_batch_run_on_a_gpu_and_the_rest_on_light_pods(tmp_path):
    spec, platform = compile_docs(tmp_path, *STUDY, "platform.gpu.count=1")
    pods = containers(spec)
    assert {step for step, pod in pods.items() if "accelerator" in pod["resources"]} == {"probe", "study-run"}
    assert {step for step in pods if "tolerations" in platform[f"exec-{step}"]} == {"probe", "study-run"}
    assert pods["study-run"]["resources"]["resourceMemoryLimit"] == "16Gi"
    assert pods["study-plan"]["resources"]["resourceMemoryLimit"] == "2Gi"


def test_the_local_platform_compiles_no_placement_and_no_retries(tmp_path):
    path = tmp_path / "local.yaml"
    compiler.Compiler().compile(graph.build_pipeline(compose_config(["platform.gpu.count=1"])), str(path))
    docs = list(yaml.safe_load_all(path.read_text()))
    spec = docs[0]
    pods = containers(spec)
    # the local runner honours retries (sleeping between them): none; resources it ignores: none either
    assert not any("retryPolicy" in task for task in all_tasks(spec).values())
    assert {step for step, pod in pods.items() if pod.get("resources")} == {"probe", "train"}
    assert all(set(pods[s]["resources"]) == {"accelerator"} for s in ("probe", "train"))


@pytest.mark.parametrize("override, message", [
    ("platform.resources.heavy.cpu_request=8", r"platform\.resources\.heavy\.cpu_request: 8 is more than the limit 4"),
    ("platform.resources.light.memory_limit=2GB", r"platform\.resources\.light\.memory_limit: a memory quantity like "
                                                  r"512Mi or 16Gi; got '2GB'"),
    ("+platform.resources.steps.trian.cpu_limit=2", r"platform\.resources\.steps: must be one of resolve_data, "),
    ("+platform.resources.steps.train.gpus=2", r"platform\.resources\.steps\.train: must be one of cpu_request, "),
    ("platform.resources.heavy.timeout_s=0", r"platform\.resources\.heavy\.timeout_s: seconds > 0 or null; got 0"),
    ("platform.tolerations=[{key: gpu, operator: Exists, value: x}]",
     r"platform\.tolerations\[0\]\.value: must be null with operator Exists"),
    ("platform.tolerations=[{key: gpu, effect: NoRun}]", r"platform\.tolerations\[0\]\.effect: must be one of"),
    ("platform.retry.backoff_factor=0.5", r"platform\.retry\.backoff_factor: must be >= 1; got 0\.5"),
])
def test_bad_placement_is_one_line_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=f"^{message}"):
        compose_config([*KUBEFLOW, override])


def test_placement_keys_are_refused_with_the_local_platform():
    with pytest.raises(ConfigError, match=r"^platform\.tolerations: only used with platform=kubeflow"):
        compose_config(["platform.tolerations=[]"])


def secret_as_env(name: str, key: str, env: str, optional: bool = True) -> dict:
    return {"secretName": name, "secretNameParameter": {"runtimeValue": {"constant": name}},
            "keyToEnv": [{"secretKey": key, "envVar": env}], "optional": optional}


def test_secrets_reach_their_steps_as_names_and_keys_never_values(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "wandb-value-5f1c0d")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-value-9e2d7a")
    spec, platform = compile_docs(tmp_path)
    text = (tmp_path / "pipeline.yaml").read_text()
    assert "wandb-value-5f1c0d" not in text and "aws-value-9e2d7a" not in text
    aws = [secret_as_env("aws-credentials", "access-key-id", "AWS_ACCESS_KEY_ID"),
           secret_as_env("aws-credentials", "secret-access-key", "AWS_SECRET_ACCESS_KEY")]
    wandb = [secret_as_env("wandb", "api-key", "WANDB_API_KEY")]
    for step, pod in containers(spec).items():
        logs_to_wandb = step in ("probe", "train", "evaluate", "promote")
        assert platform[f"exec-{step}"]["secretAsEnv"] == (wandb if logs_to_wandb else []) + aws, step
        assert "env" not in pod  # no variable of ours in the container spec (the digest comes by tag here)


def test_a_secret_of_your_own_on_the_steps_you_name(tmp_path):
    _, platform = compile_docs(tmp_path, "platform.secrets=[{secret_name: hf-token, env: {HF_TOKEN: token}, "
                                         "steps: [data_prep]}]")
    assert {name: e.get("secretAsEnv") for name, e in platform.items() if e.get("secretAsEnv")} == {
        "exec-data-prep": [secret_as_env("hf-token", "token", "HF_TOKEN", optional=False)]}


@pytest.mark.parametrize("secrets, message", [
    ("[{secret_name: Bad_Name, env: {X: y}}]", r"platform\.secrets\[0\]\.secret_name: a Kubernetes Secret's name"),
    ("[{secret_name: s, env: {}}]", r"platform\.secrets\[0\]\.env: map at least one ENV_VAR"),
    ("[{secret_name: s, env: {1X: y}}]", r"platform\.secrets\[0\]\.env: '1X' is not an environment variable name"),
    ("[{secret_name: s, env: {X: y}, steps: [trian]}]", r"platform\.secrets\[0\]\.steps: must be one of"),
])
def test_bad_secrets_are_one_line(secrets, message):
    with pytest.raises(ConfigError, match=f"^{message}"):
        compose_config([*KUBEFLOW, f"platform.secrets={secrets}"])


# --- under kfp's local runner ----------------------------------------------------------------------

CHEAP = ["data=digits", "probe.enabled=false", "train.batch_size=64", "train.micro_batch_size=64",
         "train.max_steps=20", "--no-progress"]


def test_secret_values_in_the_environment_appear_in_no_file_of_a_local_run(tmp_path, monkeypatch):
    """W&B offline (its config is what tracking records), every step: summary.json, the W&B runs,
    pipeline.log (every task's log), the report, the model."""
    from pipelines import submit

    values = {"WANDB_API_KEY": "wandb-value-5f1c0d" * 2, "AWS_SECRET_ACCESS_KEY": "aws-value-9e2d7a" * 2}
    monkeypatch.delenv("WANDB_MODE")
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    assert submit.main([f"output_dir={tmp_path / 'runs'}", "run_id=leakcheck-7f3a", *CHEAP]) == 0
    run_dir = tmp_path / "runs" / "leakcheck-7f3a"
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert {"summary.json", "pipeline.log", "config.yaml", "model.pt"} <= {p.name for p in files}
    # the W&B runs are there, and a byte search reads their config (it names the run)
    assert any(b"leakcheck-7f3a" in p.read_bytes() for p in files if p.suffix == ".wandb")
    leaked = [str(p.relative_to(run_dir)) for p in files for v in values.values() if v.encode() in p.read_bytes()]
    assert leaked == []


# --- typed parameters ------------------------------------------------------------------------------

def test_typed_parameters_a_person_sets_in_the_ui_with_defaults_from_the_config(tmp_path):
    spec, _ = compile_docs(tmp_path, "data=file", "data.path=s3://bucket/table.csv", "eval.target=0.9",
                           "probe.enabled=false", "train.batch_size=64", "train.micro_batch_size=16")
    declared = spec["root"]["inputDefinitions"]["parameters"]
    defaults = {name: d["defaultValue"] for name, d in declared.items() if name != "config_json"}
    assert defaults == {"run_id": "", "data_path": "s3://bucket/table.csv", "data_repo": "", "data_rev": "",
                        "target": "0.9", "batch_size": "64", "micro_batch_size": "16"}
    assert {d["parameterType"] for d in declared.values()} == {"STRING"}
    # every one reaches resolve_data, which hands the merged config on; without the probe train's
    # batch sizes are resolve_data's (the run's config's), not numbers compiled in
    tasks = all_tasks(spec)
    inputs = tasks["resolve-data"]["inputs"]["parameters"]
    assert {name: inputs[name]["componentInputParameter"] for name in declared} == {
        name: f"pipelinechannel--{name}" for name in declared}  # the exit handler's DAG passes them on
    assert tasks["train"]["inputs"]["parameters"]["batch_size"] == {
        "taskOutputParameter": {"outputParameterKey": "batch_size", "producerTask": "resolve-data"}}
    for step in ("data-prep", "train", "evaluate", "promote"):
        assert tasks[step]["inputs"]["parameters"]["config_json"] == {
            "taskOutputParameter": {"outputParameterKey": "config_json", "producerTask": "resolve-data"}}


def test_dvc_data_offers_its_repo_and_revision(tmp_path):
    spec, _ = compile_docs(tmp_path, "data=dvc", "data.repo=https://github.com/org/data.git", "data.rev=main",
                           "data.path=data/train.csv")
    declared = spec["root"]["inputDefinitions"]["parameters"]
    assert {k: declared[k]["defaultValue"] for k in ("data_repo", "data_rev", "data_path")} == {
        "data_repo": "https://github.com/org/data.git", "data_rev": "main", "data_path": "data/train.csv"}


LOCAL_CHEAP = ["data=digits", "probe.enabled=false", "train.batch_size=64", "train.micro_batch_size=64",
               "train.max_steps=30", "tracking.mode=disabled", "registry.enabled=false"]


def run_local(tmp_path, run_id, overrides=(), **parameters):
    """The compiled graph under kfp's local runner (pipelines/local.py), the typed parameters over
    the config's; returns the run's directory."""
    from pipelines.local import run_locally

    config = compose_config([f"output_dir={tmp_path}", f"run_id={run_id}", *LOCAL_CHEAP, *overrides])
    local = tmp_path / ".local" / run_id
    local.mkdir(parents=True)
    run_locally(graph.build_pipeline(config), {**graph.run_arguments(config), **parameters}, local, progress=False)
    return tmp_path / run_id


# --- the exit handler ------------------------------------------------------------------------------

def test_the_graph_runs_inside_an_exit_handler_whose_finalize_step_runs_whatever_happens(tmp_path):
    for pipeline, steps in (("train", ["resolve_data", "data_prep", "probe", "train", "evaluate", "promote"]),
                            ("study", ["resolve_data", "data_prep", "probe", "study_plan", "study_run",
                                       "study_report"])):
        spec, platform = compile_docs(tmp_path, *(STUDY if pipeline == "study" else []), name=f"{pipeline}.yaml")
        root = spec["root"]["dag"]["tasks"]
        assert set(root) == {"exit-handler-1", "finalize"}
        final = root["finalize"]
        assert final["triggerPolicy"] == {"strategy": "ALL_UPSTREAM_TASKS_COMPLETED"}
        assert final["dependentTasks"] == ["exit-handler-1"] and not final["cachingOptions"].get("enableCache")
        params = final["inputs"]["parameters"]
        assert params["status"] == {"taskFinalStatus": {"producerTask": "exit-handler-1"}}
        assert params["steps"]["runtimeValue"]["constant"] == steps
        # the pipeline's own parameters: resolve_data's merged config may never have been made
        assert {k: params[k] for k in ("config_json", "run_id")} == {
            "config_json": {"componentInputParameter": "config_json"}, "run_id": {"componentInputParameter": "run_id"}}
        assert "resolve-data" in spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]
        # a light pod that writes to S3: the AWS Secret, no W&B key
        assert [s["secretName"] for s in platform["exec-finalize"]["secretAsEnv"]] == ["aws-credentials"] * 2


def test_the_package_loads_back_with_kfps_loader_and_runs_under_kfps_local_runner(tmp_path):
    """The package a cluster gets (placement, retries, Secrets, tolerations, the exit handler), read
    back by kfp's loader and run by kfp's local runner: its config_json names a local output_dir
    (a run-time key); the compile-time keys are the compiled ones."""
    from google.protobuf import json_format
    from kfp import components

    from components import storage
    from pipelines.local import run_locally

    config = compose_config([*KUBEFLOW, "probe.enabled=false", "train.batch_size=64", "train.micro_batch_size=64",
                             "train.max_steps=10", "tracking.mode=disabled", "registry.enabled=false"])
    compiler.Compiler().compile(graph.build_pipeline(config), str(tmp_path / "package.yaml"))
    loaded = components.load_component_from_file(str(tmp_path / "package.yaml"))
    assert loaded.name == "convergence-train"
    assert set(loaded.component_spec.inputs) == {"config_json", "run_id", "data_path", "data_repo", "data_rev",
                                                 "target", "batch_size", "micro_batch_size"}
    platform = json_format.MessageToDict(loaded.platform_spec)["platforms"]["kubernetes"]
    assert platform["deploymentSpec"]["executors"]["exec-train"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    local = tmp_path / "local"
    local.mkdir()
    here = {**config, "output_dir": str(tmp_path / "runs"), "run_id": None}
    typed = {"run_id": "from-the-package", "target": "0.3", "batch_size": "32", "micro_batch_size": "16"}
    run_locally(loaded, {**graph.run_arguments(here), **typed}, local, progress=False)
    # the typed parameters, over config_json's values, are the run's config in every step
    summary = storage.read_json(tmp_path / "runs" / "from-the-package" / "summary.json")
    assert (summary["status"], summary["run_id"]) == ("completed", "from-the-package")
    assert (summary["effective_batch_size"], summary["micro_batch_size"], summary["accumulation_steps"]) == (32, 16, 2)
    assert summary["stop_reason"] == "target_reached" and summary["samples_seen"] == 32 * summary["optimizer_steps"]
    assert "finalize: succeeded" in (local / "pipeline.log").read_text()


BREAKS_IN_TRAIN = '''
import math, torch

class Breaks(torch.nn.Module):
    """Builds and runs forward (data_prep checks both); its backward pass raises."""
    def __init__(self, n, k):
        super().__init__()
        self.linear = torch.nn.Linear(n, k)

    def forward(self, x):
        out = self.linear(x.flatten(1))
        if out.requires_grad:
            out.register_hook(self.fail)
        return out

    @staticmethod
    def fail(grad):
        raise RuntimeError("boom in a backward pass")

def build(input_shape, output_dim):
    return Breaks(math.prod(input_shape), output_dim)
'''


def test_a_failed_run_gets_its_summary_from_the_exit_handler_naming_the_step(tmp_path, monkeypatch):
    """Under kfp's local runner, without submit (on a cluster nobody waits): a bad typed parameter
    fails resolve_data, bad data fails data_prep (which knows no run id), a crash fails train."""
    from components import storage
    from pipelines.local import PipelineFailed

    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "breaks_in_train.py").write_text(BREAKS_IN_TRAIN)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "pkg"))
    (tmp_path / "nan.csv").write_text("a,target\n" + "1.0,0\nnan,1\n3.0,1\n" * 10)
    cases = [("badparam", [], {"batch_size": "sixty"}, "resolve_data", "batch_size: 'auto' or a positive integer; "
                                                                       "got 'sixty'"),
             ("baddata", ["data=file", f"data.path={tmp_path / 'nan.csv'}"], {}, "data_prep",
              f"data: 10 NaN/inf feature values in {tmp_path / 'nan.csv'} (features a); clean or impute them first"),
             ("crash", ["model.factory=breaks_in_train:build"], {}, "train", "RuntimeError: boom in a backward pass")]
    for run_id, overrides, parameters, step, error in cases:
        with pytest.raises(PipelineFailed) as failed:
            run_local(tmp_path, run_id, overrides, **parameters)
        assert failed.value.step == step  # the local runner's own report agrees
        summary = storage.read_json(tmp_path / run_id / "summary.json")
        assert summary == {"run_id": run_id, "status": "failed", "step": step, "error": error, "kfp_state": "FAILED"}
        assert not (tmp_path / run_id / "manifest.json").exists()


# --- the rule: what is fixed at compile time, what each run reads --------------------------------

DVC = ["data=dvc", "data.repo=https://example.com/org/data.git", "data.path=data/train.csv"]
RUN_TIME = [["eval.target=0.8"], ["train.lr=0.2", "train.max_steps=7"], ["data.rev=v2"], ["tracking.group=nightly"],
            ["output_dir=s3://elsewhere/runs"], ["train.batch_size=64", "train.micro_batch_size=16"]]
COMPILE_TIME = [["pipeline=study", "eval.target=0.9"], ["platform.image=reg/img@sha256:" + "c" * 64],
                ["platform.gpu.count=1"], ["platform.gpu.type=amd.com/gpu", "platform.gpu.count=1"],
                ["platform.resources.light.memory_limit=4Gi"], ["++platform.node_selector={pool: gpu}"],
                ["platform.tolerations=[]"], ["platform.retry.max_retries=5"], ["platform.secrets=[]"],
                ["probe.enabled=false", "train.batch_size=64", "train.micro_batch_size=64"],
                ["registry.enabled=false"], ["platform.nodes=2"]]


def spec_of(tmp_path, *overrides):
    """(the package's spec sha256 without parameter defaults, the defaults) as kubeflow.py sees them."""
    from pipelines import kubeflow

    path = tmp_path / "rule.yaml"
    compiler.Compiler().compile(graph.build_pipeline(compose_config([*KUBEFLOW, *DVC, *overrides])), str(path))
    spec, platform = kubeflow.read_package(path)
    defaults = {k: d["defaultValue"] for k, d in spec["root"]["inputDefinitions"]["parameters"].items()}
    return kubeflow.spec_digest(spec, platform), defaults


def test_a_run_time_key_changes_only_the_parameters_defaults(tmp_path):
    base, base_defaults = spec_of(tmp_path)
    for overrides in RUN_TIME:
        digest, defaults = spec_of(tmp_path, *overrides)
        assert digest == base, overrides  # one pipeline version serves them all
        assert defaults != base_defaults, overrides


def test_a_compile_time_key_changes_the_spec(tmp_path):
    base, _ = spec_of(tmp_path)
    for overrides in COMPILE_TIME:
        assert spec_of(tmp_path, *overrides)[0] != base, overrides
    study, _ = spec_of(tmp_path, "pipeline=study", "eval.target=0.9")
    assert spec_of(tmp_path, "pipeline=study", "eval.target=0.9", "study.parallelism=2")[0] != study
    # every key the rule names is exercised here
    exercised = {o.lstrip("+").split("=")[0] for case in COMPILE_TIME for o in case} | {"study.parallelism"}
    assert all(any(e == key or e.startswith(key + ".") for e in exercised) for key in graph.COMPILE_TIME), \
        sorted(set(graph.COMPILE_TIME) - exercised)
