"""The Kubernetes API as the train_job step uses it (components/trainjob_launch.py): a TrainJob to
create, read and delete, its JobSet, the namespace's events for it and the rank-0 pod's log,
through the kubernetes client (30.1.0, pinned) with the pod's in-cluster service account.

Every refusal becomes one line (components/errors.py: ClusterError) naming what was asked and the
permission it needs; the Role the pipeline's service account needs in the run's namespace:

    apiVersion: rbac.authorization.k8s.io/v1
    kind: Role
    metadata: {name: convergence-train-launcher}
    rules:
      - {apiGroups: [trainer.kubeflow.org], resources: [trainjobs], verbs: [create, get, delete]}
      - {apiGroups: [jobset.x-k8s.io], resources: [jobsets], verbs: [get]}
      - {apiGroups: [""], resources: [events, pods], verbs: [list]}
      - {apiGroups: [""], resources: [pods/log], verbs: [get]}

bound (RoleBinding) to the service account the pipeline's pods run as (on Kubeflow's multi-user
install: default-editor in the profile's namespace).
"""

from pathlib import Path
from typing import List, Optional

from components import trainjob
from components.errors import ClusterError

NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")  # the pod's own namespace
JOBSET = ("jobset.x-k8s.io", "v1alpha2", "jobsets")  # what Trainer creates for a TrainJob, named like it
NODE_CONTAINER = "node"  # the torch-distributed runtime's container
NOT_INSTALLED = "Kubeflow Trainer is not installed on this cluster (no trainer.kubeflow.org/v1alpha1 TrainJob)"
REQUEST_TIMEOUT_S = 30
ROLE_HINT = ("the pipeline's service account needs a Role with create/get/delete on trainjobs.trainer.kubeflow.org, "
             "get on jobsets.jobset.x-k8s.io, list on events and pods, get on pods/log (components/k8s.py)")


def rank0_selector(name: str) -> str:
    """The pod of node 0 (rank 0's) of the TrainJob `name`, by the labels JobSet and Job give it."""
    return (f"jobset.sigs.k8s.io/jobset-name={name},jobset.sigs.k8s.io/replicatedjob-name={trainjob.REPLICATED_JOB},"
            "batch.kubernetes.io/job-completion-index=0")


def in_cluster_client():
    """An ApiClient with the pod's service account (its token and CA, KUBERNETES_SERVICE_HOST)."""
    from kubernetes import client, config

    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException as exc:
        raise ClusterError(f"train_job: not inside a Kubernetes pod ({exc}); it runs as a step of the pipeline "
                           "on the cluster") from None
    return client.ApiClient(configuration)


def pod_namespace(fallback: Optional[str], path: Path = NAMESPACE_FILE) -> str:
    """The namespace this pod runs in (where the TrainJob goes), else platform.namespace."""
    if path.is_file():
        return path.read_text().strip()
    if fallback:
        return fallback
    raise ClusterError("platform.namespace: train_job runs outside a pod here and knows no namespace; set "
                       "platform.namespace")


class Transient(ClusterError):
    """The API server was unreachable or answered 429/5xx: worth asking again."""


class Cluster:
    """One namespace of one cluster; `api_client`: a kubernetes.client.ApiClient."""

    def __init__(self, api_client, namespace: str):
        from kubernetes import client

        self.namespace = namespace
        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)
        self.host = api_client.configuration.host

    def _call(self, what: str, fn, *args, missing_ok: bool = False, trainjobs: bool = False, **kwargs):
        """fn's answer; None for a missing object when missing_ok; one line for any refusal. On
        trainjobs a 404 that names no object means the CRD (or the namespace) is missing."""
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            return fn(*args, _request_timeout=REQUEST_TIMEOUT_S, **kwargs)
        except ApiException as exc:
            if exc.status == 404 and _names_an_object(exc) and missing_ok:
                return None
            if exc.status == 404 and trainjobs and not _names_an_object(exc):
                raise ClusterError(_missing_resource(exc, self.namespace)) from None
            raise self._refusal(what, exc) from None
        except HTTPError as exc:
            raise Transient(f"train_job: {what}: cannot reach the Kubernetes API at {self.host} ({exc})") from None

    def _refusal(self, what: str, exc) -> ClusterError:
        said = _status_message(exc)
        if exc.status == 401:
            return ClusterError(f"train_job: {what}: 401 Unauthorized: the API server refused the pod's service "
                                f"account token ({said})")
        if exc.status == 403:
            return ClusterError(f"train_job: {what}: 403 Forbidden ({said}); {ROLE_HINT}")
        kind = Transient if exc.status == 429 or exc.status >= 500 else ClusterError
        return kind(f"train_job: {what}: {exc.status} {exc.reason} ({said})")

    def _trainjob(self, what: str, method: str, *args, **kwargs):
        return self._call(what, getattr(self.custom, method), trainjob.GROUP, trainjob.VERSION, self.namespace,
                          trainjob.PLURAL, *args, trainjobs=True, **kwargs)

    # -- the TrainJob ------------------------------------------------------------------------
    def create_trainjob(self, body: dict) -> dict:
        return self._trainjob(f"create TrainJob {self.namespace}/{body['metadata']['name']}",
                              "create_namespaced_custom_object", body)

    def get_trainjob(self, name: str) -> Optional[dict]:
        """The TrainJob, or None when there is none of that name."""
        return self._trainjob(f"get TrainJob {self.namespace}/{name}", "get_namespaced_custom_object", name,
                              missing_ok=True)

    def delete_trainjob(self, name: str) -> None:
        """Its JobSet and pods go with it (background propagation)."""
        from kubernetes import client

        self._trainjob(f"delete TrainJob {self.namespace}/{name}", "delete_namespaced_custom_object", name,
                       body=client.V1DeleteOptions(propagation_policy="Background"), missing_ok=True)

    # -- what explains it --------------------------------------------------------------------
    def get_jobset(self, name: str) -> Optional[dict]:
        group, version, plural = JOBSET
        return self._call(f"get JobSet {self.namespace}/{name}", self.custom.get_namespaced_custom_object, group,
                          version, self.namespace, plural, name, missing_ok=True)

    def events(self, name: str) -> List[dict]:
        """The namespace's events about objects named `name` (the TrainJob and its JobSet), oldest first."""
        answer = self._call(f"list events of {self.namespace}/{name}", self.core.list_namespaced_event,
                            self.namespace, field_selector=f"involvedObject.name={name}")
        events = [{"kind": e.involved_object.kind, "type": e.type, "reason": e.reason, "message": e.message,
                   "count": e.count, "time": _event_time(e)} for e in answer.items]
        return sorted(events, key=lambda e: e["time"] or "")

    def rank0_pod(self, name: str) -> Optional[str]:
        pods = self._call(f"list pods of TrainJob {self.namespace}/{name}", self.core.list_namespaced_pod,
                          self.namespace, label_selector=rank0_selector(name)).items
        return sorted(p.metadata.name for p in pods)[0] if pods else None

    def pod_log(self, pod: str, tail_lines: Optional[int] = None, since_seconds: Optional[int] = None) -> str:
        """The node container's log, each line starting with its RFC 3339 timestamp."""
        kwargs = {k: v for k, v in (("tail_lines", tail_lines), ("since_seconds", since_seconds)) if v}
        return self._call(f"read the log of pod {self.namespace}/{pod}", self.core.read_namespaced_pod_log, pod,
                          self.namespace, container=NODE_CONTAINER, timestamps=True, **kwargs)


def _status(exc) -> dict:
    import json

    try:
        body = json.loads(exc.body or "{}")
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _status_message(exc) -> str:
    return _status(exc).get("message") or (exc.body or "").strip()[:200] or "no message"


def _names_an_object(exc) -> bool:
    """A 404 about one object (details name it) rather than about the resource or URL itself."""
    details = _status(exc).get("details") or {}
    return bool(details.get("name")) and details.get("kind") != "namespaces"


def _missing_resource(exc, namespace: str) -> str:
    details = _status(exc).get("details") or {}
    if details.get("kind") == "namespaces":
        return f"train_job: namespace {namespace} does not exist on this cluster"
    return NOT_INSTALLED


def _event_time(event) -> Optional[str]:
    for value in (event.last_timestamp, event.event_time, event.first_timestamp, event.metadata.creation_timestamp):
        if value is not None:
            return value.isoformat() if hasattr(value, "isoformat") else str(value)
    return None
