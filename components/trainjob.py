"""The Kubeflow Trainer TrainJob that trains a run on several nodes (platform.nodes > 1).

One KFP task cannot span nodes, so such a run's train_job step (components/trainjob_launch.py:
it uploads the inputs, creates this, follows it and collects the outputs) hands its training to a
TrainJob (trainer.kubeflow.org/v1alpha1, Kubeflow Trainer v2.3) on the `torch-distributed`
runtime: numNodes pods of the same image, each running

    torchrun -m components.train --config <run>/trainjob/config.json --dataset <run>/trainjob/dataset
        --model-out /tmp/convergence/model.pt --run-dir <run> --storage '<storage.* as JSON>'

TrainJob pods are not KFP tasks: they get no artifacts, so every input is a storage URI under
the run's store (`inputs_uri`), put there before the TrainJob is created, and the outputs go to the
run's store as a train step's do (rank 0 writes; components/train.py). torchrun finds the
rendezvous in the PET_* variables the controller injects (PET_NNODES, PET_NPROC_PER_NODE,
PET_NODE_RANK, PET_MASTER_ADDR/PORT): setting any of them here would fight it, so none is set.

Version facts (Trainer's API renamed the scheduling field in every recent release, and a field a
release does not know is silently pruned): v2.0 podSpecOverrides, v2.1 podTemplateOverrides,
v2.2-v2.3 runtimePatches keyed by a domain-prefixed manager. GPUs go in limits. numProcPerNode is
set explicitly (its default, "auto", is the CPU request on a CPU pod), so the world size the
launcher sees is the config's (components/config.py: Config.world_size).
"""

import hashlib
import json
import re
from typing import Optional

from components.config import parse_config
from components.errors import ConfigError
from components.lineage import IMAGE_DIGEST_ENV
from components.placement import image_digest, pod_resources
from components.run_store import join_uri, run_uri

API_VERSION = "trainer.kubeflow.org/v1alpha1"  # GROUP/VERSION below
RUNTIME = "torch-distributed"  # the ClusterTrainingRuntime Trainer installs; its replicated job is "node"
REPLICATED_JOB = "node"
GROUP, VERSION, PLURAL = "trainer.kubeflow.org", "v1alpha1", "trainjobs"
MANAGER = "convergence-pipeline.dev/train-launcher"  # owns our runtimePatches entry
INPUTS_DIR = "trainjob"  # in the run's store: config.json, dataset/, probe.json for the pods
MODEL_OUT = "/tmp/convergence/model.pt"  # in each pod; rank 0 also puts it in the run's store
RESERVED_ENV = ("PET_",)  # torchrun's rendezvous, injected by the controller
NAME_LIMIT = 42  # a KFP job id (a UUID) fits whole; pods are <name>-node-<i>-<j>-<suffix> and a headless service <name>: DNS labels of 63


def inputs_uri(config: dict) -> str:
    return join_uri(run_uri(config), INPUTS_DIR)


def job_name(run_id: str) -> str:
    """A DNS label from the run id: lowercase letters, digits and '-', starting with a letter; a
    run id that had to be shortened or changed keeps a hash of itself, so two runs do not collide."""
    label = re.sub(r"[^a-z0-9-]+", "-", run_id.lower()).strip("-")
    name = f"train-{label}"
    if name == f"train-{run_id}" and len(name) <= NAME_LIMIT:
        return name
    digest = hashlib.sha256(run_id.encode()).hexdigest()[:8]
    return f"{name[:NAME_LIMIT - 9].rstrip('-')}-{digest}"


def manifest(config: dict, with_probe: bool = False) -> dict:
    """The TrainJob for a resolved config with its run id (components.config.with_run_id)."""
    cfg = parse_config(config)
    pf = config["platform"]
    run, inputs = run_uri(config), inputs_uri(config)
    args = ["--config", join_uri(inputs, "config.json"), "--dataset", join_uri(inputs, "dataset"),
            "--model-out", MODEL_OUT, "--run-dir", run, "--storage", json.dumps(config["storage"], sort_keys=True)]
    if with_probe:
        args += ["--probe", join_uri(inputs, "probe.json")]
    trainer = {"image": pf["image"], "command": ["torchrun", "-m", "components.train"], "args": args,
               "numNodes": cfg.nodes, "numProcPerNode": cfg.nproc_per_node,
               "resourcesPerNode": resources(pf)}
    env = environment(pf)
    if env:
        trainer["env"] = env
    spec = {"runtimeRef": {"name": RUNTIME}, "trainer": trainer}
    timeout = pod_resources(pf, "train")["timeout_s"]
    if timeout:
        spec["activeDeadlineSeconds"] = int(timeout)
    patch = scheduling(pf)
    if patch:
        spec["runtimePatches"] = [{"manager": MANAGER, "trainingRuntimeSpec": {"template": {"spec": {
            "replicatedJobs": [{"name": REPLICATED_JOB, "template": {"spec": {"template": {"spec": patch}}}}]}}}}]
    metadata = {"name": job_name(cfg.run_id), "labels": {"app.kubernetes.io/part-of": "convergence-pipeline"}}
    if pf.get("namespace"):
        metadata["namespace"] = pf["namespace"]
    return {"apiVersion": API_VERSION, "kind": "TrainJob", "metadata": metadata, "spec": spec}


def resources(pf: dict) -> dict:
    """The train step's requests and limits (platform.resources), with its GPUs in limits only
    (Kubernetes takes an extended resource's request from its limit)."""
    pod = pod_resources(pf, "train")
    limits = {k: str(pod[f"{k}_limit"]) for k in ("cpu", "memory") if pod[f"{k}_limit"] is not None}
    requests = {k: str(pod[f"{k}_request"]) for k in ("cpu", "memory") if pod[f"{k}_request"] is not None}
    if pf["gpu"]["count"]:
        limits[pf["gpu"]["type"]] = int(pf["gpu"]["count"])
    return {k: v for k, v in (("limits", limits), ("requests", requests)) if v}


def environment(pf: dict) -> list:
    """platform.secrets that the train step gets, as secretKeyRefs (names only, never a value), and
    the image's digest for lineage."""
    env = []
    for secret in pf["secrets"]:
        if secret["steps"] is None or "train" in secret["steps"]:
            for name, key in secret["env"].items():
                if name.startswith(RESERVED_ENV):
                    raise ConfigError(f"platform.secrets: {name} is torchrun's rendezvous, set by Kubeflow Trainer; "
                                      "use another variable name")
                env.append({"name": name, "valueFrom": {"secretKeyRef": {
                    "name": secret["secret_name"], "key": key, "optional": bool(secret["optional"])}}})
    digest = image_digest(pf["image"])
    if digest is not None:
        env.append({"name": IMAGE_DIGEST_ENV, "value": digest})
    return env


def scheduling(pf: dict) -> Optional[dict]:
    """Node selector and tolerations for the pods (the GPU steps' platform.node_selector and
    platform.tolerations), as a pod spec patch; None when there are none."""
    patch = {}
    if pf["node_selector"]:
        patch["nodeSelector"] = {k: str(v) for k, v in pf["node_selector"].items()}
    tolerations = []
    for t in pf["tolerations"]:
        toleration = {"key": t["key"], "operator": t["operator"], "value": t["value"], "effect": t["effect"],
                      "tolerationSeconds": t["toleration_seconds"]}
        tolerations.append({k: v for k, v in toleration.items() if v is not None})
    if tolerations:
        patch["tolerations"] = tolerations
    return patch or None
