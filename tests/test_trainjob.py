"""The Kubeflow Trainer TrainJob for several nodes (components/trainjob.py): it validates against
Trainer v2.3's TrainJob CRD with unknown fields refused, and is asserted field by field; its pods'
command reads the config and dataset from storage URIs (no KFP artifacts there), tested on moto;
platform.nodes' config rules."""

import copy
import hashlib
import json

import pytest

from components import data_prep, storage, train, trainjob
from components.config import Config, parse_config, with_run_id
from components.errors import ConfigError
from components.run_store import RunStore, settings_of
from k8s_standin import trainjob_validator
from pipelines.config import compose_config

JOB_ID = "3f2b8c1e-6d4a-4b7e-9a10-5c2d7e8f9a0b"  # a KFP job id: the run id on a cluster
DIGEST = "sha256:" + "ab" * 32


@pytest.fixture(scope="module")
def validator():
    return trainjob_validator()


def errors(validator, manifest):
    return sorted(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(manifest))


@pytest.fixture
def two_nodes():
    """A cluster config of 2 nodes x 2 GPUs."""
    raw = compose_config(["platform=kubeflow", "platform.nodes=2", "platform.host=https://kfp.example.com",
                          "output_dir=s3://b/runs", "data=digits", "platform.gpu.count=2",
                          f"platform.image=reg/img@{DIGEST}",
                          "platform.namespace=team-ml", "++platform.node_selector={nvidia.com/gpu.product: H100}",
                          "storage.endpoint_url=http://minio:9000"])
    return with_run_id(raw, JOB_ID)


def test_the_trainjob_validates_against_the_crd_and_says_what_the_run_needs(two_nodes, validator):
    job = trainjob.manifest(two_nodes)
    assert errors(validator, job) == []
    assert (job["apiVersion"], job["kind"]) == ("trainer.kubeflow.org/v1alpha1", "TrainJob")
    assert job["metadata"] == {"name": f"train-{JOB_ID}", "namespace": "team-ml",
                               "labels": {"app.kubernetes.io/part-of": "convergence-pipeline"}}
    spec = job["spec"]
    assert spec["runtimeRef"] == {"name": "torch-distributed"}
    t = spec["trainer"]
    assert t["image"] == f"reg/img@{DIGEST}"
    assert t["command"] == ["torchrun", "-m", "components.train"]  # torchrun reads the injected PET_* variables
    inputs = f"s3://b/runs/{JOB_ID}/trainjob"
    assert t["args"] == ["--config", f"{inputs}/config.json", "--dataset", f"{inputs}/dataset",
                         "--model-out", "/tmp/convergence/model.pt", "--run-dir", f"s3://b/runs/{JOB_ID}",
                         "--storage", json.dumps(two_nodes["storage"], sort_keys=True)]
    assert json.loads(t["args"][-1])["endpoint_url"] == "http://minio:9000"
    assert (t["numNodes"], t["numProcPerNode"]) == (2, 2)
    assert t["numNodes"] * t["numProcPerNode"] == parse_config(two_nodes).world_size == 4
    # conf/platform/kubeflow.yaml's heavy step resources; the GPUs in limits only
    assert t["resourcesPerNode"] == {"limits": {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": 2},
                                     "requests": {"cpu": "2", "memory": "8Gi"}}
    assert t["env"] == [
        {"name": "WANDB_API_KEY", "valueFrom": {"secretKeyRef": {"name": "wandb", "key": "api-key", "optional": True}}},
        {"name": "AWS_ACCESS_KEY_ID",
         "valueFrom": {"secretKeyRef": {"name": "aws-credentials", "key": "access-key-id", "optional": True}}},
        {"name": "AWS_SECRET_ACCESS_KEY",
         "valueFrom": {"secretKeyRef": {"name": "aws-credentials", "key": "secret-access-key", "optional": True}}},
        {"name": "CONVERGENCE_IMAGE_DIGEST", "value": DIGEST}]
    assert not [e for e in t["env"] if e["name"].startswith("PET_")]
    assert spec["activeDeadlineSeconds"] == 86400
    (patch,) = spec["runtimePatches"]
    assert patch["manager"] == "convergence-pipeline.dev/train-launcher"
    (node,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert node["name"] == "node"  # the torch-distributed runtime's replicated job
    assert node["template"]["spec"]["template"]["spec"] == {
        "nodeSelector": {"nvidia.com/gpu.product": "H100"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]}
    assert set(spec) == {"runtimeRef", "trainer", "activeDeadlineSeconds", "runtimePatches"}


def test_fields_of_other_trainer_releases_and_typos_are_refused(two_nodes, validator):
    job = trainjob.manifest(two_nodes)
    old = copy.deepcopy(job)  # v2.1's name for the scheduling override: v2.3 would drop it silently
    old["spec"]["podTemplateOverrides"] = old["spec"].pop("runtimePatches")
    assert errors(validator, old) == ["spec: Additional properties are not allowed ('podTemplateOverrides' was "
                                      "unexpected)"]
    typo = copy.deepcopy(job)
    typo["spec"]["trainer"]["numNode"] = typo["spec"]["trainer"].pop("numNodes")
    assert errors(validator, typo) == ["spec/trainer: Additional properties are not allowed ('numNode' was "
                                       "unexpected)"]
    wrong = copy.deepcopy(job)
    wrong["spec"]["trainer"]["numProcPerNode"] = "auto"  # v2.3 takes an integer
    assert errors(validator, wrong) == ["spec/trainer/numProcPerNode: 'auto' is not of type 'integer'"]


def test_cpu_pods_and_no_placement_give_a_plain_trainjob(validator):
    raw = with_run_id(compose_config(["platform=kubeflow", "platform.host=https://kfp.example.com",
                                      "output_dir=s3://b/runs", "data=digits", "train.nproc=2", "platform.tolerations=[]",
                                      "platform.secrets=[]", "platform.resources.heavy.timeout_s=null"]), "Run_1")
    job = trainjob.manifest(raw, with_probe=True)
    assert errors(validator, job) == []
    t = job["spec"]["trainer"]
    assert t["numProcPerNode"] == 2 and t["numNodes"] == 1 and "env" not in t  # CPU pods: train.nproc each
    assert "nvidia.com/gpu" not in t["resourcesPerNode"]["limits"]
    assert t["args"][-2:] == ["--probe", "s3://b/runs/Run_1/trainjob/probe.json"]
    assert set(job["spec"]) == {"runtimeRef", "trainer"} and "namespace" not in job["metadata"]
    assert job["metadata"]["name"] == "train-run-1-" + hashlib.sha256(b"Run_1").hexdigest()[:8]  # changed: hashed


def test_job_names_are_short_dns_labels_that_keep_runs_apart():
    assert trainjob.job_name("r1") == "train-r1"
    long = trainjob.job_name("a" * 80)
    assert len(long) <= 42 and long.startswith("train-aaaa") and long != trainjob.job_name("a" * 81)
    assert trainjob.job_name("Run_1") != trainjob.job_name("run-1")


def test_a_secret_named_like_torchruns_rendezvous_is_refused(two_nodes):
    two_nodes["platform"]["secrets"].append({"secret_name": "x", "env": {"PET_MASTER_ADDR": "a"}, "optional": False,
                                             "steps": None})
    with pytest.raises(ConfigError, match=r"^platform.secrets: PET_MASTER_ADDR is torchrun's rendezvous, set by "
                                          r"Kubeflow Trainer; use another variable name$"):
        trainjob.manifest(two_nodes)


def test_the_pods_command_reads_its_config_and_dataset_from_storage_uris(s3_server, s3_bucket, tmp_path):
    """What a TrainJob pod runs, in one process here: inputs under <run>/trainjob/ in S3 (moto)."""
    raw = Config().to_dict()
    raw["train"].update(batch_size=64, micro_batch_size=32, max_steps=6)
    raw["tracking"]["mode"] = "disabled"
    raw.update(output_dir=f"s3://{s3_bucket}/runs", run_id="tj")
    raw["storage"]["endpoint_url"] = s3_server.endpoint_url
    data_prep.run(raw, str(tmp_path / "dataset"))
    inputs = RunStore.open(trainjob.inputs_uri(raw), settings_of(raw))
    storage.write_json(tmp_path / "config.json", raw)
    inputs.put_file(tmp_path / "config.json", "config.json")
    for path in sorted((tmp_path / "dataset").rglob("*")):
        if path.is_file():
            inputs.put_file(path, f"dataset/{path.relative_to(tmp_path / 'dataset').as_posix()}")
    args = trainjob.manifest(raw)["spec"]["trainer"]["args"]
    args[args.index("--model-out") + 1] = str(tmp_path / "pod" / "model.pt")
    train.main(args)
    run = RunStore.open(f"s3://{s3_bucket}/runs/tj", settings_of(raw))
    assert run.get_json("train_result.json")["optimizer_steps"] == 6
    assert {"model.pt", "metrics.jsonl", "checkpoints/last.pt"} <= set(run.list())


CLUSTER = ["platform=kubeflow", "platform.host=http://127.0.0.1:9", "output_dir=s3://b/runs", "data=digits"]


def test_several_nodes_need_a_cluster_one_training_and_s3():
    with pytest.raises(ConfigError, match=r"^platform\.nodes: 2 nodes train as a Kubeflow Trainer TrainJob: use "
                                          r"platform=kubeflow \(on one machine, train\.nproc=N processes\)$"):
        compose_config(["platform.nodes=2"])
    with pytest.raises(ConfigError, match=r"^platform\.nodes: the study trains each of its runs in one study_run pod"):
        compose_config([*CLUSTER, "pipeline=study", "eval.target=0.9", "platform.nodes=2"])
    with pytest.raises(ConfigError, match=r"^platform\.nodes: the TrainJob's pods read their inputs and write the "
                                          r"run through output_dir: use s3://bucket/prefix; got 'runs'$"):
        compose_config([*CLUSTER, "output_dir=runs", "platform.nodes=2"])
    with pytest.raises(ConfigError, match=r"^platform\.nodes: must be an integer >= 1; got 0$"):
        compose_config([*CLUSTER, "platform.nodes=0"])
    with pytest.raises(ConfigError, match=r"^platform\.trainjob_start_timeout_s: must be > 0; got 0"):
        compose_config([*CLUSTER, "platform.trainjob_start_timeout_s=0"])
