"""Contract tests of the train_job step (components/trainjob_launch.py) against a stand-in of the
Kubernetes API on loopback (tests/k8s_standin.py) that the real kubernetes client talks to: the
TrainJob it creates (validated against Trainer v2.3's CRD, unknown fields refused), the exact
requests, and the scenarios: the manifest's own command trained on two "nodes" here against moto
S3 and collected as the train step's outputs; Failed; no start within the timeout; no Trainer; 401/403."""

import json
import re
from types import SimpleNamespace

import pytest
import torch

from components import data_prep, storage, train, train_outputs, trainjob, trainjob_launch
from components.config import with_run_id
from components.errors import ClusterError
from components.k8s import NOT_INSTALLED
from components.run_store import RunStore, settings_of
from k8s_standin import K8sStandin, RunPods, condition, jobs_status, trainjob_validator
from pipelines import steps
from pipelines.config import compose_config

JOB_ID = "5d1e7a90-2b3c-4d5e-8f60-718293a4b5c6"
NAME = f"train-{JOB_ID}"
NS = "team-ml"
BASE = f"/apis/trainer.kubeflow.org/v1alpha1/namespaces/{NS}/trainjobs"
SECRETS = {("aws-credentials", "access-key-id"): "testing", ("aws-credentials", "secret-access-key"): "testing"}
CHEAP = ["data=digits", "probe.enabled=false", "train.batch_size=64", "train.micro_batch_size=32", "train.max_steps=6",
         "train.checkpoint_every_s=null", "tracking.mode=disabled", "registry.enabled=false"]


@pytest.fixture(scope="module")
def validator():
    return trainjob_validator()


@pytest.fixture
def standin(validator):
    server = K8sStandin(validator).start()
    yield server
    server.stop()
    assert server.invalid == []  # every TrainJob received and served is one the CRD admits


def cluster_config(bucket: str, endpoint: str, *overrides, nodes: int = 2) -> dict:
    raw = compose_config(["platform=kubeflow", f"platform.nodes={nodes}", "platform.host=http://127.0.0.1:9",
                          f"output_dir=s3://{bucket}/runs", f"platform.namespace={NS}", "platform.gpu.count=0",
                          f"storage.endpoint_url={endpoint}", *CHEAP, *overrides])
    return with_run_id(raw, JOB_ID)


@pytest.fixture
def cluster(s3_server, s3_bucket, tmp_path):
    """A 2-node config on moto S3 and its dataset artifact."""
    config = cluster_config(s3_bucket, s3_server.endpoint_url)
    data_prep.run(config, str(tmp_path / "dataset"))
    return SimpleNamespace(config=config, dataset=str(tmp_path / "dataset"),
                           store=RunStore.open(f"s3://{s3_bucket}/runs/{JOB_ID}", settings_of(config)))


def launch(standin, config, dataset, model_out, **kwargs):
    return trainjob_launch.run(config, dataset, str(model_out), api_client=standin.api_client(), poll_s=0.05, **kwargs)


def artifacts(tmp_path, name):
    metrics = {}
    model = SimpleNamespace(path=str(tmp_path / f"{name}.pt"), metadata={})
    return model, SimpleNamespace(log_metric=metrics.__setitem__, values=metrics)


def train_on_two_nodes(standin, cluster, tmp_path, monkeypatch):
    """The KFP component's own body, as the train_job task runs it (the batch sizes as the probe gives
    them), its TrainJob run by RunPods: (config, outcome, model artifact, metrics artifact)."""
    # the pod's in-cluster service account cannot exist here: the stand-in's client in its place
    monkeypatch.setattr(trainjob_launch, "in_cluster_client", standin.api_client)
    monkeypatch.setattr(trainjob_launch, "POLL_S", 0.05)
    pods = RunPods(tmp_path / "pods", SECRETS)
    standin.on_create = pods
    # a running TrainJob has no condition (v2.3): a start timeout long past is no failure
    config = {**cluster.config, "platform": {**cluster.config["platform"], "trainjob_start_timeout_s": 0.01}}
    model, metrics = artifacts(tmp_path, "job")
    try:
        out = steps.train_job(storage.dumps({**config, "run_id": None}), JOB_ID, 64, 32,
                              SimpleNamespace(path=cluster.dataset), model, metrics)
    finally:
        pods.stop()
    return config, json.loads(out), model, metrics


def test_two_nodes_train_the_manifests_command_and_the_step_hands_on_the_train_steps_outputs(
        standin, cluster, tmp_path, capsys, monkeypatch):
    config, outcome, model, metrics = train_on_two_nodes(standin, cluster, tmp_path, monkeypatch)
    # the requests, in order: is it there (no), create, follow (TrainJob, rank 0's pod and log), delete
    pod0 = f"{NAME}-node-0-0-x7k2p"
    follow = [("GET", f"{BASE}/{NAME}"), ("GET", f"/api/v1/namespaces/{NS}/pods"),
              ("GET", f"/api/v1/namespaces/{NS}/pods/{pod0}/log")]
    paths = standin.paths()
    assert paths[:2] == [("GET", f"{BASE}/{NAME}"), ("POST", BASE)] and paths[-1] == ("DELETE", f"{BASE}/{NAME}")
    assert set(paths[2:-1]) == set(follow)
    (created,) = [body for method, _, _, body in standin.requests if method == "POST"]
    expected = trainjob.manifest({**config, "train": {**config["train"], "batch_size": 64, "micro_batch_size": 32}})
    expected["metadata"]["namespace"] = NS
    assert created == expected
    assert created["spec"]["trainer"]["numNodes"] == 2 and created["spec"]["trainer"]["numProcPerNode"] == 1
    queries = {q.get("labelSelector") for m, p, q, _ in standin.requests if p.endswith("/pods")}
    assert queries == {f"jobset.sigs.k8s.io/jobset-name={NAME},jobset.sigs.k8s.io/replicatedjob-name=node,"
                       "batch.kubernetes.io/job-completion-index=0"}
    # the ranks really trained together: 6 steps of 64 = 2 ranks x 32, the outcome rank 0 published
    assert (outcome["optimizer_steps"], outcome["samples_seen"], outcome["effective_batch_size"]) == (6, 384, 64)
    assert outcome == cluster.store.get_json("train_result.json")
    assert metrics.values == train_outputs.metrics(outcome) and metrics.values["optimizer_steps"] == 6
    assert model.metadata == {"data_version": outcome["data_version"], "config_hash": outcome["config_hash"],
                              "status": "completed", "has_weights": True}
    cluster.store.get_file("model.pt", tmp_path / "stored.pt")
    assert (tmp_path / "stored.pt").read_bytes() == (tmp_path / "job.pt").read_bytes()
    assert cluster.store.list("trainjob/") == []  # the staged inputs went with the TrainJob
    printed = capsys.readouterr().out
    assert f"train_job: created TrainJob {NS}/{NAME}: torch-distributed, 2 nodes x 1 processes" in printed
    assert f"train_job: TrainJob {NS}/{NAME}: no conditions; node: 2 active, 2 ready" in printed  # running, no timeout
    assert f"train_job: TrainJob {NS}/{NAME}: Complete=True (JobsCompleted); node: 0 active" in printed


@pytest.mark.slow
def test_two_nodes_train_what_one_train_step_with_two_local_ranks_trains(standin, cluster, tmp_path, monkeypatch):
    """The same effective batch over the same 2 ranks, launched by torchrun --standalone: the same weights."""
    _, outcome, _, _ = train_on_two_nodes(standin, cluster, tmp_path, monkeypatch)
    local = with_run_id(compose_config(["train.nproc=2", f"output_dir={tmp_path / 'runs'}", *CHEAP]), "local")
    mine = train.run(local, cluster.dataset, str(tmp_path / "local.pt"))
    assert {k: mine[k] for k in train_outputs.METRIC_KEYS if k != "wall_time_s"} == {
        k: outcome[k] for k in train_outputs.METRIC_KEYS if k != "wall_time_s"}
    assert set(mine) == set(outcome) and mine["best_metric"] == outcome["best_metric"]
    theirs, ours = (torch.load(tmp_path / f, weights_only=False)["state_dict"] for f in ("job.pt", "local.pt"))
    assert all(torch.equal(theirs[k], ours[k]) for k in ours)


def failing_controller(standin, job):
    name = job["metadata"]["name"]
    standin.set_status(name, jobsStatus=jobs_status(active=2))
    pod = f"{name}-node-0-0-abcde"
    standin.add_pod(pod, {"jobset.sigs.k8s.io/jobset-name": name, "jobset.sigs.k8s.io/replicatedjob-name": "node",
                          "batch.kubernetes.io/job-completion-index": "0"})
    for line in [f"step {i}" for i in range(60)] + ["RuntimeError: CUDA error: an illegal memory access"]:
        standin.log(pod, line)
    standin.set_status(name, jobsStatus=jobs_status(failed=1), conditions=[condition(
        "Failed", "JobsFailed", "jobset failed: job train-x-node-0 failed: BackoffLimitExceeded")])


@pytest.mark.parametrize("keep", [False, True])
def test_a_failed_trainjob_fails_the_step_with_its_message_after_rank_0s_log_tail(standin, cluster, tmp_path, capsys,
                                                                                  keep):
    standin.on_create = failing_controller
    config = {**cluster.config, "platform": {**cluster.config["platform"], "trainjob_keep": keep}}
    with pytest.raises(trainjob_launch.TrainJobFailed) as failed:
        launch(standin, config, cluster.dataset, tmp_path / "model.pt")
    assert str(failed.value) == (f"train_job: TrainJob {NS}/{NAME} failed (JobsFailed): jobset failed: job "
                                 "train-x-node-0 failed: BackoffLimitExceeded; rank 0's log tail is above")
    printed = capsys.readouterr().out
    # followed as it went (each line once), then its tail before the error
    assert [line for line in printed.splitlines() if line.startswith("  [rank 0] ")] == [
        f"  [rank 0] step {i}" for i in range(60)] + ["  [rank 0] RuntimeError: CUDA error: an illegal memory access"]
    tail = printed[printed.index("the last 50 lines of rank 0's log"):].splitlines()[1:51]
    assert tail == [f"  step {i}" for i in range(11, 60)] + ["  RuntimeError: CUDA error: an illegal memory access"]
    assert ("DELETE", f"{BASE}/{NAME}") in standin.paths() if not keep else NAME in standin.trainjobs
    assert not (tmp_path / "model.pt").exists()
    # with trainjob_keep, a retry of the step finds the failed one, deletes it and trains again
    if keep:
        standin.on_create = None
        standin.requests.clear()
        config["platform"]["trainjob_start_timeout_s"] = 0.2
        with pytest.raises(trainjob_launch.TrainJobFailed, match="did not start within 0.2 s"):
            launch(standin, config, cluster.dataset, tmp_path / "model.pt")
        assert standin.paths()[:3] == [("GET", f"{BASE}/{NAME}"), ("DELETE", f"{BASE}/{NAME}"),
                                       ("GET", f"{BASE}/{NAME}")]
        assert ("POST", BASE) in standin.paths()


def test_no_conditions_until_the_start_timeout_fails_showing_the_jobset_and_events(standin, cluster, tmp_path,
                                                                                  capsys):
    def stuck(standin, job):  # the JobSet exists but its jobs were never admitted
        name = job["metadata"]["name"]
        standin.jobsets[name] = {"apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet",
                                 "metadata": {"name": name, "namespace": NS},
                                 "status": {"replicatedJobsStatus": [{"name": "node", "active": 0, "failed": 0,
                                                                      "ready": 0, "succeeded": 0, "suspended": 0}]}}
        standin.event(name, "TrainJob", "Normal", "Created", "created JobSet")
        standin.event(name, "JobSet", "Warning", "FailedCreate", 'jobs "x" is forbidden: exceeded quota: gpu-quota')

    standin.on_create = stuck
    config = {**cluster.config, "platform": {**cluster.config["platform"], "trainjob_start_timeout_s": 0.3}}
    with pytest.raises(trainjob_launch.TrainJobFailed) as failed:
        launch(standin, config, cluster.dataset, tmp_path / "model.pt")
    assert str(failed.value) == (
        f"train_job: TrainJob {NS}/{NAME} did not start within 0.3 s (platform.trainjob_start_timeout_s): no "
        f"conditions, JobSet {NAME}: node: 0 active, 0 failed; last event: JobSet FailedCreate: jobs \"x\" is "
        "forbidden: exceeded quota: gpu-quota")
    printed = capsys.readouterr().out
    assert "TrainJob Normal Created: created JobSet" in printed and "JobSet Warning FailedCreate" in printed
    asked = {(p, q.get("fieldSelector")) for _, p, q, _ in standin.requests}
    assert (f"/apis/jobset.x-k8s.io/v1alpha2/namespaces/{NS}/jobsets/{NAME}", None) in asked
    assert (f"/api/v1/namespaces/{NS}/events", f"involvedObject.name={NAME}") in asked
    assert standin.paths()[-1] == ("DELETE", f"{BASE}/{NAME}") and cluster.store.list("trainjob/") == []


def test_without_a_jobset_the_error_says_so(standin, cluster, tmp_path):
    config = {**cluster.config, "platform": {**cluster.config["platform"], "trainjob_start_timeout_s": 0.1}}
    with pytest.raises(trainjob_launch.TrainJobFailed, match=r"no conditions, no JobSet; no events$"):
        launch(standin, config, cluster.dataset, tmp_path / "model.pt")


@pytest.mark.parametrize("refuse, message", [
    ("no-crd", f"^{re.escape(NOT_INSTALLED)}$"),
    (401, r"^train_job: get TrainJob team-ml/\S+: 401 Unauthorized: the API server refused the pod's service "
          r"account token \(Unauthorized\)$"),
    (403, r'^train_job: get TrainJob team-ml/\S+: 403 Forbidden \(trainjobs.trainer.kubeflow.org is forbidden: User '
          r'"system:serviceaccount:team-ml:default-editor" cannot get resource "trainjobs" .*\); the pipeline\'s '
          r"service account needs a Role with create/get/delete on trainjobs.trainer.kubeflow.org, get on "
          r"jobsets.jobset.x-k8s.io, list on events and pods, get on pods/log \(components/k8s.py\)$"),
])
def test_a_cluster_that_refuses_is_one_line_and_nothing_is_staged(standin, cluster, tmp_path, refuse, message):
    standin.refuse = refuse
    with pytest.raises(ClusterError, match=message):
        launch(standin, cluster.config, cluster.dataset, tmp_path / "model.pt")
    assert [m for m, *_ in standin.requests] == ["GET"] and cluster.store.list() == []


def test_a_missing_trainer_is_named_when_creating_too(standin, cluster, tmp_path):
    """A 404 naming no object (the API server's answer for an unknown resource) on the create."""
    from components.k8s import Cluster

    standin.refuse = "no-crd"
    with pytest.raises(ClusterError, match=f"^{re.escape(NOT_INSTALLED)}$"):
        Cluster(standin.api_client(), NS).create_trainjob(trainjob.manifest(cluster.config))


def test_a_trainjob_of_an_earlier_try_is_followed_not_created_again(standin, cluster, tmp_path):
    """A retried step (a preempted launcher pod) finds its TrainJob complete: it collects the outputs."""
    job = trainjob.manifest(cluster.config)
    job["metadata"]["namespace"] = NS
    standin.trainjobs[NAME] = {**job, "status": {"conditions": [condition("Complete", "JobsCompleted", "done")]}}
    outcome = {"model_file": None, "optimizer_steps": 3}  # diverged before any finite evaluation: no model
    cluster.store.put_json("train_result.json", outcome)
    assert launch(standin, cluster.config, cluster.dataset, tmp_path / "model.pt") == outcome
    assert standin.paths() == [("GET", f"{BASE}/{NAME}"), ("GET", f"/api/v1/namespaces/{NS}/pods"),
                               ("DELETE", f"{BASE}/{NAME}")]
